"""The binary column block of a trajectory message (schema 2): every per-trajectory scalar in one buffer.

For K trajectories over P distinct prompts, little-endian, in this order (61 K + 4 P bytes):

    float64 [2, K]       reward, advantage
    int64   [4, K]       group_id, sample_index, policy_version, worker_id
    int32   [K + P + 2K] completion_lens [K], prompt_lens [P], prompt_index [K], extra_index [K]
    uint8   [K]          finish_code (an index into FINISH_REASONS)

Wider types first, so every block starts aligned. The codec checks it (codec.py), a `TrajectoryBatch`
reads its columns as views of it, and a worker's batch is built straight into it, so a message's
scalars are packed once and sent as they are. A small block is also readable as one `struct` record
(`column_struct`): a few dozen Python numbers cost less to check than one numpy call per block.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

FLOAT_COLUMNS = ("reward", "advantage")
INT_COLUMNS = ("group_id", "sample_index", "policy_version", "worker_id")
INDEX_COLUMNS = ("completion_lens", "prompt_lens", "prompt_index", "extra_index")  # prompt_lens has P values
CODE_COLUMNS = ("finish_code",)
# As the header lists it: [name, dtype] in buffer order.
COLUMNS = [
    *([name, "float64"] for name in FLOAT_COLUMNS), *([name, "int64"] for name in INT_COLUMNS),
    *([name, "int32"] for name in INDEX_COLUMNS), *([name, "uint8"] for name in CODE_COLUMNS),
]
BYTES_PER_ROW = 8 * len(FLOAT_COLUMNS) + 8 * len(INT_COLUMNS) + 4 * 3 + len(CODE_COLUMNS)  # 61
BYTES_PER_PROMPT = 4


def column_bytes(count: int, num_prompts: int) -> int:
    """Bytes of the block for `count` trajectories over `num_prompts` distinct prompts."""
    return BYTES_PER_ROW * count + BYTES_PER_PROMPT * num_prompts


def prompts_in(nbytes: int, count: int) -> int:
    """P of a block of `nbytes` bytes holding `count` rows."""
    return (nbytes - BYTES_PER_ROW * count) // BYTES_PER_PROMPT


@lru_cache(maxsize=1024)  # one per (count, prompts) seen: the codec asks for small counts only, so a few hundred
def column_struct(count: int, num_prompts: int) -> struct.Struct:
    """The block as one record: unpack() gives 2K floats, 4K ints, K + P + 2K ints, K ints, in block order."""
    return struct.Struct(f"<{2 * count}d{4 * count}q{3 * count + num_prompts}i{count}B")


def column_views(data: Any, count: int, num_prompts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four typed blocks as views of `data`: [2, K] float64, [4, K] int64, [K + P + 2K] int32, [K] uint8."""
    k = count
    floats = np.frombuffer(data, np.float64, 2 * k, 0).reshape(2, k)
    ints = np.frombuffer(data, np.int64, 4 * k, 16 * k).reshape(4, k)
    index = np.frombuffer(data, np.int32, 3 * k + num_prompts, 48 * k)
    codes = np.frombuffer(data, np.uint8, k, 60 * k + 4 * num_prompts)
    return floats, ints, index, codes


def pack_columns(
    reward: Sequence[float], advantage: Sequence[float], group_id: Sequence[int] | int, sample_index: Sequence[int],
    policy_version: Sequence[int], worker_id: Sequence[int] | int, completion_lens: Sequence[int],
    prompt_lens: Sequence[int], prompt_index: Sequence[int] | int, extra_index: Sequence[int] | int,
    finish_code: Sequence[int],
) -> np.ndarray:
    """A new block from whole columns (sequences or arrays; a scalar fills its column)."""
    count, num_prompts = len(finish_code), len(prompt_lens)
    data = np.empty(column_bytes(count, num_prompts), dtype=np.uint8)  # [61 K + 4 P]
    floats, ints, index, codes = column_views(data, count, num_prompts)
    floats[0], floats[1] = reward, advantage
    ints[0], ints[1], ints[2], ints[3] = group_id, sample_index, policy_version, worker_id
    k, p = count, num_prompts
    index[:k], index[k : k + p], index[k + p : 2 * k + p], index[2 * k + p :] = (
        completion_lens, prompt_lens, prompt_index, extra_index)
    codes[:] = finish_code
    return data
