"""Wire format of trajectories (schema 2): a msgpack header frame plus one raw frame per tensor.

One message carries one or more trajectories (a worker usually sends a whole group at once):

    frame 0: msgpack header {schema: 2, count: K, prompts: P, tensors: [[name, dtype, shape]...],
             columns: "name:dtype,...", column_data: bytes, extras: [map, ...]}
    frame 1: token_ids           int32 little-endian: the P distinct prompts, then the K completions
    frame 2: behaviour_logprobs  float32, aligned with the completions

`column_data` holds every per-trajectory scalar as binary columns, laid out as wire_columns.py says:
float64 [2, K] (reward, advantage), int64 [4, K] (group_id, sample_index, policy_version, worker_id),
int32 [K + P + 2K] (completion_lens, prompt_lens, prompt_index, extra_index: which map of `extras` the
row carries), uint8 [K] (finish_code: an index into FINISH_REASONS). `extras` lists the distinct metric
maps once (a worker's reward-failure counts are one map for a whole group; every empty map is one entry),
so per-row extras cost four bytes. Prompts and completions share a frame: one part fewer for ZeroMQ to
move and one token-id check for the receiver.

A message is data: `decode` checks every field before building anything (never pickle, never eval) and
raises `MalformedMessage` naming the bad value. Each column is checked whole with one numpy call
(finiteness through one dot product, a minimum, a maximum, a segment sum); a row is looked at alone only
to name the culprit of a rejected message. Declared sizes are checked against the frames' byte lengths
and `max_message_bytes` before any allocation. A schema-1 message (or any other version) is refused as
`UnsupportedSchema`, which the receiver counts apart.

A message of at most SMALL_MESSAGE trajectories (a worker streaming samples one by one) is first put
through `_accept_small`: the same checks as conjunctions that only say yes or no, with the column block
read as one struct record and the tensor table compared whole, since there a numpy call per column costs
more than the data. Anything it does not accept goes through the full checks, which name the fault (or
accept a message that only its shortcuts passed over, such as a column sum that overflows a float). The
header is parsed once for both.

`decode` returns a `TrajectoryBatch`: columns over the received frames (a zmq.Frame stays alive as long
as an array or tensor made from it), no per-trajectory object; its tensors are made from the frames'
arrays when first read. `encode` takes a TrajectoryBatch (sent as it is when packed, as a worker's
group and a decoded message are) or any sequence of objects with the `Trajectory` attributes.
"""

from __future__ import annotations

import math
import sys
from operator import attrgetter
from typing import Any, Sequence

import msgpack
import numpy as np
import torch
import zmq

from async_grpo.transport.trajectory import FINISH_REASONS, Trajectory
from async_grpo.transport.trajectory_batch import FINISH_CODES, TrajectoryBatch
from async_grpo.transport.wire_columns import (
    CODE_COLUMNS, COLUMNS, FLOAT_COLUMNS, INDEX_COLUMNS, INT_COLUMNS, column_bytes, column_struct, column_views,
    pack_columns, prompts_in,
)

SCHEMA_VERSION = 2
# (field name, dtype name, torch dtype) in frame order.
TENSOR_FIELDS: tuple[tuple[str, str, torch.dtype], ...] = (
    ("token_ids", "int32", torch.int32),
    ("behaviour_logprobs", "float32", torch.float32),
)
COLUMN_LAYOUT = ",".join(f"{name}:{dtype}" for name, dtype in COLUMNS)  # the header's one-string layout
HEADER_KEYS = frozenset({"schema", "count", "prompts", "tensors", "columns", "column_data", "extras"})
MAX_TRAJECTORIES_PER_MESSAGE = 65536
MAX_EXTRA_KEYS = 64
MAX_EXTRA_KEY_CHARS = 128
SMALL_MESSAGE = 32  # trajectories: up to here (about) the struct-record checks beat numpy's per-call cost
# Frames carry the host's native order; the schema says little-endian, so a big-endian host is refused.
if sys.byteorder != "little":
    raise ImportError(f"trajectory codec: host byte order {sys.byteorder!r}, expected 'little' (the wire format)")

_INT32 = np.dtype(np.int32)
_FLOAT32 = np.dtype(np.float32)
_ROW_ATTRS = ("reward", "advantage", "group_id", "sample_index", "policy_version", "worker_id", "finish_reason")
_row_of = attrgetter(*_ROW_ATTRS)
_prompt_of = attrgetter("prompt_ids")
_completion_of = attrgetter("completion_ids")
_logprobs_of = attrgetter("behaviour_logprobs")
_extra_of = attrgetter("extra")
_numel = torch.Tensor.numel
_NUM_FINISH = len(FINISH_REASONS)
_TENSOR_NAMES = [[name, dtype_name] for name, dtype_name, _ in TENSOR_FIELDS]
_TOKENS_NAME, _LOGPROBS_NAME = _TENSOR_NAMES
_Frame = zmq.Frame
# The ufuncs' own reductions: the ndarray methods add a Python-level wrapper per call.
_min, _max, _sum = np.minimum.reduce, np.maximum.reduce, np.add.reduce
_max_at, _sum_at = np.maximum.reduceat, np.add.reduceat


class MalformedMessage(ValueError):
    """A received message that does not match the trajectory schema; it is counted and dropped."""


class UnsupportedSchema(MalformedMessage):
    """A message of another schema version (an older or newer worker): counted apart, then dropped."""


def _frames(count: int, num_prompts: int, token_arr: np.ndarray, logprob_arr: np.ndarray, column_data: Any,
            extras: list) -> list[Any]:
    """The header (bytes) and the two tensor frames."""
    header = msgpack.packb({
        "schema": SCHEMA_VERSION,
        "count": count,
        "prompts": num_prompts,
        "tensors": [[*_TOKENS_NAME, [token_arr.size]], [*_LOGPROBS_NAME, [logprob_arr.size]]],
        "columns": COLUMN_LAYOUT,
        "column_data": column_data,
        "extras": extras,
    }, use_bin_type=True)
    return [header, token_arr, logprob_arr]


def encode(items: TrajectoryBatch | Trajectory | Sequence[Any]) -> list[Any]:
    """Frames of one message: bytes header, then one numpy array per tensor field.

    A packed TrajectoryBatch (a worker's group, a decoded message) is sent as views of its tensors and
    its column block; a list of trajectories (or views) has its tokens and logprobs concatenated once.
    """
    if isinstance(items, TrajectoryBatch):
        if items.packed and 0 < len(items) <= MAX_TRAJECTORIES_PER_MESSAGE:
            return _encode_packed(items)
        items = items.views()
    trajs = [items] if isinstance(items, Trajectory) else list(items)
    if not trajs:
        raise ValueError("encode() got no trajectories: expected at least one")
    count = len(trajs)
    if count > MAX_TRAJECTORIES_PER_MESSAGE:
        raise ValueError(f"encode() got {count} trajectories: at most {MAX_TRAJECTORIES_PER_MESSAGE} per message")
    # Identity, not content: the G samples of a prompt share one tensor. All are alive (held by `trajs`)
    # for the whole call, so no id() can be reused.
    all_prompts = list(map(_prompt_of, trajs))
    slot_of: dict[int, int] = {}
    prompt_index = [slot_of.setdefault(id(p), len(slot_of)) for p in all_prompts]
    prompts = list({id(p): p for p in all_prompts}.values()) if len(slot_of) > 1 else all_prompts[:1]
    completions = list(map(_completion_of, trajs))
    logprobs = list(map(_logprobs_of, trajs))
    tokens = torch.cat([*prompts, *completions])  # [sum P + sum C]
    flat_logprobs = logprobs[0] if count == 1 else torch.cat(logprobs)  # [sum C]
    # Maps by identity (a worker hands a group one map); every empty map is one entry (key 0: no id is 0).
    all_extras = list(map(_extra_of, trajs))
    extra_slot: dict[int, int] = {}
    extra_index = [extra_slot.setdefault(id(e) if e else 0, len(extra_slot)) for e in all_extras]
    extras = list({id(e) if e else 0: e for e in all_extras}.values())
    reward, advantage, group, sample, version, worker, reasons = zip(*map(_row_of, trajs))
    data = pack_columns(  # [61 K + 4 P]
        reward, advantage, group, sample, version, worker, list(map(_numel, completions)),
        list(map(_numel, prompts)), prompt_index, extra_index, [FINISH_CODES[r] for r in reasons])
    return _frames(count, len(prompts), tokens.numpy(), flat_logprobs.numpy(), data.data, extras)


def _encode_packed(batch: TrajectoryBatch) -> list[Any]:
    """A packed batch's frames: its tensors and its column block as they are (packed once, at build)."""
    data = batch.wire_columns
    if type(data) is np.ndarray:  # a worker's block, packed at build: msgpack takes its buffer
        data = data.data
    nbytes = len(data) if type(data) is bytes else memoryview(data).nbytes  # bytes: a decoded message's block
    count = len(batch)
    return _frames(count, prompts_in(nbytes, count), *batch.frame_arrays(), data, batch.extras)


def encoded_nbytes(traj: Any) -> int:
    """Tensor bytes one trajectory adds to a message (its prompt counted in full)."""
    return 4 * (traj.prompt_ids.numel() + 2 * traj.completion_ids.numel())


def _fail(what: str, value: Any, expected: str) -> MalformedMessage:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return MalformedMessage(f"{what} = {shown}: expected {expected}")


def _first_bad(bad: np.ndarray, names: Sequence[str], values: np.ndarray, expected: str) -> MalformedMessage:
    """Name the first flagged entry of a [columns, K] block (only called on a rejected message)."""
    column, row = (int(i) for i in np.argwhere(bad)[0])
    return _fail(f"column '{names[column]}'[{row}]", values[column, row].item(), expected)


def _first_bad_index(index: np.ndarray, count: int, num_prompts: int, bad: np.ndarray, expected: str) -> MalformedMessage:
    """Name the first flagged entry of the int32 block (completion_lens, prompt_lens, prompt_index, extra_index)."""
    at = int(np.argmax(bad))
    starts = (0, count, count + num_prompts, 2 * count + num_prompts)
    column = max(c for c, start in enumerate(starts) if at >= start)
    return _fail(f"column '{INDEX_COLUMNS[column]}'[{at - starts[column]}]", int(index[at]), expected)


def _check_extras(extras: Any, count: int) -> None:
    if not isinstance(extras, list) or not 1 <= len(extras) <= count:
        raise _fail("header 'extras'", extras, f"a list of 1 to count={count} maps")
    for i, metrics in enumerate(extras):
        if metrics == {}:
            continue
        if not isinstance(metrics, dict) or len(metrics) > MAX_EXTRA_KEYS:
            raise _fail(f"header 'extras'[{i}]", metrics, f"a map of at most {MAX_EXTRA_KEYS} metrics")
        for key, v in metrics.items():
            if not isinstance(key, str) or len(key) > MAX_EXTRA_KEY_CHARS:
                raise _fail(f"header 'extras'[{i}] key", key, f"a string of at most {MAX_EXTRA_KEY_CHARS} characters")
            if type(v) not in (float, int) or not math.isfinite(v):
                raise _fail(f"header 'extras'[{i}]['{key}']", v, "a finite number")


def _check_tensor_table(tensors: Any, max_message_bytes: int) -> list[int]:
    """Validated element count of each tensor frame, in frame order."""
    if type(tensors) is not list or len(tensors) != len(TENSOR_FIELDS):
        raise _fail("header 'tensors'", tensors, f"{len(TENSOR_FIELDS)} entries [name, dtype, shape]")
    if [e[:2] if type(e) is list and len(e) == 3 else e for e in tensors] != _TENSOR_NAMES:
        raise _fail("header 'tensors' names/dtypes", tensors, f"{_TENSOR_NAMES} with a shape each")
    numels = []
    for (name, _, dtype), (_, _, shape) in zip(TENSOR_FIELDS, tensors):
        if type(shape) is not list or len(shape) != 1 or type(shape[0]) is not int or shape[0] < 0:
            raise _fail(f"tensor '{name}' shape", shape, "[length] with a non-negative length")
        nbytes = shape[0] * dtype.itemsize
        if nbytes > max_message_bytes:
            raise _fail(f"tensor '{name}' declared bytes", nbytes, f"at most max_message_bytes={max_message_bytes}")
        numels.append(shape[0])
    return numels


def _frame_nbytes(frame: Any) -> int:
    """Byte length of a frame: a zmq.Frame (received with copy=False), bytes, or any buffer (an array being sent)."""
    kind = type(frame)
    if kind is zmq.Frame or kind is bytes or kind is bytearray:
        return len(frame)
    return memoryview(frame).nbytes


def _frame_array(frame: Any, dtype: np.dtype, numel: int) -> np.ndarray:
    """[numel] array over the frame's bytes: a view of a writable frame (a received zmq.Frame keeps
    its message alive through it), a copy of a read-only one, so tensors made from it are writable."""
    if type(frame) is _Frame and numel:  # what the receiver hands over: checked first
        return np.frombuffer(frame, dtype)
    if numel == 0:  # frombuffer refuses an empty buffer
        return np.empty(0, dtype=dtype)
    if type(frame) is not _Frame and memoryview(frame).readonly:
        return np.frombuffer(bytearray(frame), dtype=dtype)
    return np.frombuffer(frame, dtype=dtype)


def decode(frames: Sequence[Any], max_message_bytes: int) -> TrajectoryBatch:
    """The trajectories of one received message as columns; raises MalformedMessage on anything off-schema.

    Tensors are views of writable frames (zmq.Frame, bytearray, arrays): the caller must not reuse
    that memory. Read-only frames (bytes) are copied.
    """
    header = None
    try:
        header = _parse_header(frames, max_message_bytes)
        batch = _accept_small(frames, header)
    except Exception:  # something off the common path: the full checks below name it
        batch = None
    if batch is not None:
        return batch
    try:
        return _decode(frames, max_message_bytes, header)
    except MalformedMessage:
        raise
    except Exception as err:  # a check this module did not foresee still must not stop the receiver
        raise MalformedMessage(f"message failed validation ({type(err).__name__}: {err})") from None


def _parse_header(frames: Sequence[Any], max_message_bytes: int) -> Any:
    """The parsed header of a message of three frames within the byte limit; None for any other message
    (raises on a header that is not msgpack). Parsed once: the full checks reuse it."""
    header_frame, tokens, logprobs = frames  # not three frames: ValueError, and `_decode` says so
    if _frame_nbytes(header_frame) + _frame_nbytes(tokens) + _frame_nbytes(logprobs) > max_message_bytes:
        return None
    return msgpack.unpackb(header_frame, raw=False, strict_map_key=True, use_list=True)


def _accept_small(frames: Sequence[Any], header: Any) -> TrajectoryBatch | None:
    """The batch of a well-formed message of at most SMALL_MESSAGE trajectories, else None.

    Every check of `_decode` is here, each as a condition at least as strict (nothing is accepted that
    `_decode` refuses); None, or any exception, sends the message to `_decode`. The tensor table is
    compared whole; the column block is unpacked as one struct record and checked with builtins over
    its slices, the float columns' finiteness through one Python sum (a sum that overflows is left to
    `_decode`); the logprobs' through numpy's NaN-propagating minimum and maximum, which raise no
    floating-point flags (so no errstate). Columns and tensors are left for the batch to make when
    first read.
    """
    if type(header) is not dict or header.keys() != HEADER_KEYS:  # None: not three frames within the limit
        return None
    schema, k, p, tensors = header["schema"], header["count"], header["prompts"], header["tensors"]
    if (type(schema) is not int or schema != SCHEMA_VERSION or type(k) is not int or not 1 <= k <= SMALL_MESSAGE
            or type(p) is not int or not 1 <= p <= k):
        return None
    # Shapes within the limit follow from the frames' byte lengths (4 bytes an int32 or a float32).
    _, tokens, logprobs = frames
    num_tokens, num_logprobs = tensors[0][2][0], tensors[1][2][0]
    if (type(num_tokens) is not int or type(num_logprobs) is not int
            or tensors != [[*_TOKENS_NAME, [num_tokens]], [*_LOGPROBS_NAME, [num_logprobs]]]
            or _frame_nbytes(tokens) != 4 * num_tokens or _frame_nbytes(logprobs) != 4 * num_logprobs):
        return None
    data, extras = header["column_data"], header["extras"]
    if header["columns"] != COLUMN_LAYOUT or type(data) is not bytes or len(data) != column_bytes(k, p):
        return None
    _check_extras(extras, k)
    # Block order (wire_columns.py): floats [2K], ints [4K], completion_lens [K], prompt_lens [P],
    # prompt_index [K], extra_index [K], finish codes [K]. The ints and the lengths are >= 0 together.
    values = column_struct(k, p).unpack(data)
    completion_total = sum(values[6 * k : 7 * k])
    if (not math.isfinite(sum(values[: 2 * k])) or min(values[2 * k : 9 * k + p]) < 0
            or max(values[7 * k + p : 8 * k + p]) >= p or max(values[8 * k + p : 9 * k + p]) >= len(extras)
            or max(values[9 * k + p :]) >= _NUM_FINISH or completion_total != num_logprobs
            or sum(values[7 * k : 7 * k + p]) + completion_total != num_tokens):
        return None
    token_arr = _frame_array(tokens, _INT32, num_tokens)  # [sum P + sum C]
    logprob_arr = _frame_array(logprobs, _FLOAT32, num_logprobs)  # [sum C]
    if num_tokens and _min(token_arr) < 0:
        return None
    if num_logprobs and not (math.isfinite(_min(logprob_arr)) and math.isfinite(_max(logprob_arr))):
        return None
    return TrajectoryBatch.from_columns(token_arr, logprob_arr, data, k, extras)


def _decode(frames: Sequence[Any], max_message_bytes: int, header: Any = None) -> TrajectoryBatch:
    """Every check, naming the first that fails; `header`: the header frame already parsed, if it was."""
    if not frames:
        raise MalformedMessage("empty message: expected a header frame and tensor frames")
    sizes = list(map(_frame_nbytes, frames))
    if sum(sizes) > max_message_bytes:
        raise _fail("message bytes", sum(sizes), f"at most max_message_bytes={max_message_bytes}")
    if header is None:
        try:
            header = msgpack.unpackb(frames[0], raw=False, strict_map_key=True, use_list=True)
        except Exception as err:  # msgpack raises several types for garbage; all mean the same here
            raise MalformedMessage(f"header frame is not valid msgpack ({type(err).__name__}: {err})") from None
    if type(header) is dict and "schema" in header and (type(header["schema"]) is not int
                                                        or header["schema"] != SCHEMA_VERSION):
        raise UnsupportedSchema(
            f"unsupported schema: header 'schema' = {header['schema']!r}: expected schema version {SCHEMA_VERSION}")
    if type(header) is not dict or header.keys() != HEADER_KEYS:
        keys = sorted(map(str, header)) if isinstance(header, dict) else type(header).__name__
        raise _fail("header keys", keys, f"a map with exactly {sorted(HEADER_KEYS)}")
    count, num_prompts = header["count"], header["prompts"]
    if type(count) is not int or not 1 <= count <= MAX_TRAJECTORIES_PER_MESSAGE:
        raise _fail("header 'count'", count, f"an integer in [1, {MAX_TRAJECTORIES_PER_MESSAGE}]")
    if type(num_prompts) is not int or not 1 <= num_prompts <= count:
        raise _fail("header 'prompts'", num_prompts, f"an integer in [1, count={count}]")
    numels = _check_tensor_table(header["tensors"], max_message_bytes)
    if len(frames) != 1 + len(TENSOR_FIELDS):
        raise _fail("frame count", len(frames), f"{1 + len(TENSOR_FIELDS)} (header + one per tensor)")
    for (name, _, dtype), numel, size in zip(TENSOR_FIELDS, numels, sizes[1:]):
        if size != numel * dtype.itemsize:
            raise _fail(f"tensor '{name}' frame bytes", size, f"{numel} x {dtype.itemsize} = {numel * dtype.itemsize}")
    if header["columns"] != COLUMN_LAYOUT:
        raise _fail("header 'columns'", header["columns"], f"the schema-{SCHEMA_VERSION} layout {COLUMN_LAYOUT!r}")
    data = header["column_data"]
    if type(data) is not bytes or len(data) != column_bytes(count, num_prompts):
        shown = len(data) if type(data) is bytes else type(data).__name__
        raise _fail("header 'column_data' bytes", shown, f"{column_bytes(count, num_prompts)} bytes for "
                    f"count={count}, prompts={num_prompts}")
    extras = header["extras"]
    _check_extras(extras, count)
    floats, ints, index, codes = column_views(data, count, num_prompts)

    # One call per block (a reduceat covers several columns of one block); a failed check walks the
    # block only to name the bad entry.
    k, p = count, num_prompts
    if _min(ints, None) < 0:
        raise _first_bad(ints < 0, INT_COLUMNS, ints, "a non-negative 64-bit integer")
    if _min(index) < 0:
        raise _first_bad_index(index, k, p, index < 0, "a non-negative int32")
    pointer_max = _max_at(index, [k + p, 2 * k + p])  # [2]: largest prompt_index, largest extra_index
    if pointer_max[0] >= p or pointer_max[1] >= len(extras):
        bounds = np.concatenate([np.full(k + p, 2**31 - 1), np.full(k, p), np.full(k, len(extras))])
        raise _first_bad_index(index, k, p, index >= bounds,
                               f"an index below its bound (prompts={p}, len(extras)={len(extras)})")
    if _max(codes) >= _NUM_FINISH:
        raise _first_bad((codes >= _NUM_FINISH)[None], CODE_COLUMNS, codes[None],
                         f"a finish code below {_NUM_FINISH} ({FINISH_REASONS})")
    totals = _sum_at(index, [0, k, k + p], dtype=np.int64)  # [3]: completion tokens, prompt tokens, the rest
    completion_total, prompt_total = int(totals[0]), int(totals[1])
    if completion_total != numels[1]:
        raise _fail("sum of 'completion_lens'", completion_total, f"the behaviour_logprobs length {numels[1]}")
    if prompt_total + completion_total != numels[0]:
        raise _fail("sum of 'prompt_lens'", prompt_total,
                    f"the token_ids length {numels[0]} less the completion tokens {completion_total}")

    token_arr = _frame_array(frames[1], _INT32, numels[0])  # [sum P + sum C] int32
    logprob_arr = _frame_array(frames[2], _FLOAT32, numels[1])  # [sum C] float32
    if token_arr.size and _min(token_arr) < 0:
        at = int(np.argmax(token_arr < 0))
        name, row = ("prompt_ids", at) if at < prompt_total else ("completion_ids", at - prompt_total)
        raise _fail(f"{name}[{row}]", int(token_arr[at]), "token ids >= 0")
    # x.x is NaN or inf when any x is (one BLAS call); it can also overflow on huge finite values,
    # which the exact check then clears.
    with np.errstate(over="ignore", invalid="ignore"):
        column_squares = floats.ravel().dot(floats.ravel())
        squares = logprob_arr.dot(logprob_arr)
    if not math.isfinite(column_squares) and not np.isfinite(floats).all():
        raise _first_bad(~np.isfinite(floats), FLOAT_COLUMNS, floats, "a finite number")
    if not math.isfinite(squares):
        finite = np.isfinite(logprob_arr)
        if not finite.all():
            raise _fail("behaviour_logprobs value", float(logprob_arr[~finite][0]), "finite logprobs")
    return TrajectoryBatch.from_columns(token_arr, logprob_arr, data, count, extras, (floats, ints, index, codes))
