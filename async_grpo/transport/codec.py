"""Wire format of trajectories: a msgpack header frame plus one raw frame per tensor.

One message carries one or more trajectories (a worker usually sends a whole group at once):

    frame 0: msgpack header {schema, count, tensors: [[name, dtype, shape]...], prompt_lens, prompt_index,
             completion_lens, scalars: {name: [one value per trajectory]}, extra: [dict per trajectory]}
    frame 1: prompt_ids          int32 little-endian, the distinct prompts concatenated
    frame 2: completion_ids      int32, all completions concatenated
    frame 3: behaviour_logprobs  float32, aligned with frame 2

Samples of one group that share a `prompt_ids` tensor send it once (`prompt_index` maps each
trajectory to its prompt). A message of one trajectory sends views of its tensors; a message of
several concatenates each field once (one copy, measured far cheaper than a frame per tensor, which
costs ZeroMQ and the receiver a few microseconds per frame). A message is data: `decode` checks every
field against this schema before building anything (never pickle, never eval) and raises
`MalformedMessage` naming the bad value; declared sizes are checked against the frames' byte lengths
and `max_message_bytes` before any allocation.

Decoded tensors are views of the received frames (a zmq.Frame stays alive as long as a tensor made
from it), so the learner gets them without a copy; a read-only frame (bytes) is copied once, so the
tensors are always writable. The per-message cost is a fixed handful of C-level calls: columns are
gathered and checked whole (`operator.attrgetter`, set/min/max over lists, one numpy reduction per
tensor frame); Python walks element by element only to name the bad value of a rejected message.
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

SCHEMA_VERSION = 1
# (field name, dtype name, torch dtype) in frame order; the schema of version 1.
TENSOR_FIELDS: tuple[tuple[str, str, torch.dtype], ...] = (
    ("prompt_ids", "int32", torch.int32),
    ("completion_ids", "int32", torch.int32),
    ("behaviour_logprobs", "float32", torch.float32),
)
FLOAT_SCALARS = ("reward", "advantage")
INT_SCALARS = ("group_id", "sample_index", "policy_version", "worker_id")
HEADER_KEYS = frozenset(
    {"schema", "count", "tensors", "prompt_lens", "prompt_index", "completion_lens", "scalars", "extra"}
)
MAX_TRAJECTORIES_PER_MESSAGE = 65536
MAX_EXTRA_KEYS = 64
MAX_EXTRA_KEY_CHARS = 128
_INT64_MAX = 2**63 - 1
_FINISH_REASON_SET = frozenset(FINISH_REASONS)
# Frames carry the host's native order; the schema says little-endian, so a big-endian host is refused.
if sys.byteorder != "little":
    raise ImportError(f"trajectory codec: host byte order {sys.byteorder!r}, expected 'little' (the wire format)")

# Header columns in the order the map is written; one attrgetter call per trajectory reads them all.
_SCALAR_NAMES = ("reward", "advantage", "group_id", "sample_index", "policy_version", "worker_id", "finish_reason")
_scalar_row = attrgetter(*_SCALAR_NAMES)
_prompt_of = attrgetter("prompt_ids")
_completion_of = attrgetter("completion_ids")
_logprobs_of = attrgetter("behaviour_logprobs")
_extra_of = attrgetter("extra")
_numel = torch.Tensor.numel
_SCALAR_NAME_SET = frozenset(_SCALAR_NAMES)
_INT32 = np.dtype(np.int32)
_FLOAT32 = np.dtype(np.float32)


class MalformedMessage(ValueError):
    """A received message that does not match the trajectory schema; it is counted and dropped."""


def encode(items: Trajectory | Sequence[Trajectory]) -> list[Any]:
    """Frames of one message carrying `items`: bytes header, then one numpy array per tensor field.

    A single trajectory's frames are views of its tensors; several trajectories' fields are concatenated.
    """
    trajs = [items] if isinstance(items, Trajectory) else list(items)
    if not trajs:
        raise ValueError("encode() got no trajectories: expected at least one")
    if len(trajs) > MAX_TRAJECTORIES_PER_MESSAGE:
        raise ValueError(f"encode() got {len(trajs)} trajectories: at most {MAX_TRAJECTORIES_PER_MESSAGE} per message")
    # Identity, not content: the engine hands the G samples of a prompt the same tensor. All are alive
    # (held by `trajs`) for the whole call, so no id() can be reused.
    all_prompts = list(map(_prompt_of, trajs))
    slot_of: dict[int, int] = {}
    prompt_index = [slot_of.setdefault(id(p), len(slot_of)) for p in all_prompts]
    prompts = list({id(p): p for p in all_prompts}.values()) if len(slot_of) > 1 else all_prompts[:1]
    completions = list(map(_completion_of, trajs))
    logprobs = list(map(_logprobs_of, trajs))
    flat = [c[0] if len(c) == 1 else torch.cat(c) for c in (prompts, completions, logprobs)]  # each [sum of lengths]
    columns = zip(*map(_scalar_row, trajs))  # one tuple per scalar name, msgpack writes it as an array
    header = {
        "schema": SCHEMA_VERSION,
        "count": len(trajs),
        "tensors": [[name, dtype_name, [_numel(t)]] for (name, dtype_name, _), t in zip(TENSOR_FIELDS, flat)],
        "prompt_lens": list(map(_numel, prompts)),
        "prompt_index": prompt_index,
        "completion_lens": list(map(_numel, completions)),
        "scalars": dict(zip(_SCALAR_NAMES, columns)),
        "extra": list(map(_extra_of, trajs)),
    }
    return [msgpack.packb(header, use_bin_type=True), *(t.numpy() for t in flat)]


def encoded_nbytes(traj: Trajectory) -> int:
    """Tensor bytes one trajectory adds to a message (its prompt counted in full)."""
    return 4 * (traj.prompt_ids.numel() + 2 * traj.completion_ids.numel())


def _fail(what: str, value: Any, expected: str) -> MalformedMessage:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return MalformedMessage(f"{what} = {shown}: expected {expected}")


# Whole-column checks with C-level builtins (a set of types, min/max, sum); only a column that may be
# bad is walked element by element, to name the first bad value (or to clear a false alarm such as a
# sum that overflowed). numpy is slower than this for the few values of one message.
_NUMBER_TYPES = frozenset({float, int})
_INT_TYPES = frozenset({int})


def _bad_ints(values: list, low: int, high: int) -> bool:
    if not values:
        return False
    return not set(map(type, values)) <= _INT_TYPES or min(values) < low or max(values) > high


def _bad_numbers(values: list) -> bool:
    if not set(map(type, values)) <= _NUMBER_TYPES:
        return True
    try:
        return not math.isfinite(sum(values))
    except OverflowError:  # an int too large for a float
        return True


def _int_list(header: dict, key: str, length: int, low: int, high: int) -> list[int]:
    values = header[key]
    if not isinstance(values, list) or len(values) != length:
        raise _fail(f"header '{key}'", values, f"a list of {length} integers")
    if _bad_ints(values, low, high):
        for i, v in enumerate(values):
            if type(v) is not int or not low <= v <= high:
                raise _fail(f"header '{key}'[{i}]", v, f"an integer in [{low}, {high}]")
    return values


def _check_scalars(scalars: Any, count: int) -> None:
    if not isinstance(scalars, dict) or scalars.keys() != _SCALAR_NAME_SET:
        keys = sorted(scalars) if isinstance(scalars, dict) else scalars
        raise _fail("header 'scalars' keys", keys, f"exactly {sorted(_SCALAR_NAME_SET)}")
    reward, advantage, group, sample, version, worker, reasons = columns = [scalars[n] for n in _SCALAR_NAMES]
    for name, column in zip(_SCALAR_NAMES, columns):
        if type(column) is not list or len(column) != count:
            raise _fail(f"scalar '{name}'", column, f"a list of {count} values")
    # Columns of one kind are checked as one list; only a failure is walked to name the culprit.
    if _bad_numbers(reward + advantage):
        for name in FLOAT_SCALARS:
            for i, v in enumerate(scalars[name]):
                if type(v) not in _NUMBER_TYPES or not math.isfinite(v):
                    raise _fail(f"scalar '{name}'[{i}]", v, "a finite number")
    if _bad_ints(group + sample + version + worker, 0, _INT64_MAX):
        for name in INT_SCALARS:
            for i, v in enumerate(scalars[name]):
                if type(v) is not int or not 0 <= v <= _INT64_MAX:
                    raise _fail(f"scalar '{name}'[{i}]", v, "a non-negative 64-bit integer")
    if not set(map(type, reasons)) <= {str} or not set(reasons) <= _FINISH_REASON_SET:
        for i, v in enumerate(reasons):
            if v not in FINISH_REASONS:
                raise _fail(f"scalar 'finish_reason'[{i}]", v, f"one of {FINISH_REASONS}")


def _check_extra(extra: Any, count: int) -> None:
    if not isinstance(extra, list) or len(extra) != count:
        raise _fail("header 'extra'", extra, f"a list of {count} maps")
    for i, metrics in enumerate(extra):
        if metrics == {}:
            continue
        if not isinstance(metrics, dict) or len(metrics) > MAX_EXTRA_KEYS:
            raise _fail(f"header 'extra'[{i}]", metrics, f"a map of at most {MAX_EXTRA_KEYS} metrics")
        for key, v in metrics.items():
            if not isinstance(key, str) or len(key) > MAX_EXTRA_KEY_CHARS:
                raise _fail(f"header 'extra'[{i}] key", key, f"a string of at most {MAX_EXTRA_KEY_CHARS} characters")
            if type(v) not in (float, int) or not math.isfinite(v):
                raise _fail(f"header 'extra'[{i}]['{key}']", v, "a finite number")


def _check_tensor_table(tensors: Any, max_message_bytes: int) -> list[int]:
    """Validated element count of each tensor frame, in frame order."""
    if not isinstance(tensors, list) or len(tensors) != len(TENSOR_FIELDS):
        raise _fail("header 'tensors'", tensors, f"{len(TENSOR_FIELDS)} entries [name, dtype, shape]")
    numels = []
    for entry, (name, dtype_name, dtype) in zip(tensors, TENSOR_FIELDS):
        if not isinstance(entry, list) or len(entry) != 3:
            raise _fail("header 'tensors' entry", entry, "[name, dtype, shape]")
        if entry[0] != name or entry[1] != dtype_name:
            raise _fail(f"tensor '{name}' name/dtype", entry[:2], f"[{name!r}, {dtype_name!r}]")
        shape = entry[2]
        if not isinstance(shape, list) or len(shape) != 1 or type(shape[0]) is not int or shape[0] < 0:
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
    if numel == 0:  # frombuffer refuses an empty buffer
        return np.empty(0, dtype=dtype)
    if type(frame) is not zmq.Frame and memoryview(frame).readonly:
        return np.frombuffer(bytearray(frame), dtype=dtype)
    return np.frombuffer(frame, dtype=dtype)


def _trusted_trajectory(
    prompt_ids: torch.Tensor, completion_ids: torch.Tensor, behaviour_logprobs: torch.Tensor, reward: float,
    advantage: float, group_id: int, sample_index: int, policy_version: int, finish_reason: str, worker_id: int,
    extra: dict[str, float],
) -> Trajectory:
    """Build without Trajectory.__post_init__: decode has checked every field already, and those
    checks would be a large share of the learner's per-message cost."""
    traj = object.__new__(Trajectory)
    traj.prompt_ids, traj.completion_ids, traj.behaviour_logprobs = prompt_ids, completion_ids, behaviour_logprobs
    traj.reward, traj.advantage, traj.group_id, traj.sample_index = reward, advantage, group_id, sample_index
    traj.policy_version, traj.finish_reason, traj.worker_id, traj.extra = policy_version, finish_reason, worker_id, extra
    return traj


def decode(frames: Sequence[Any], max_message_bytes: int) -> list[Trajectory]:
    """Trajectories of one received message; raises MalformedMessage on anything off-schema.

    Tensors are views of writable frames (zmq.Frame, bytearray, arrays): the caller must not reuse
    that memory. Read-only frames (bytes) are copied.
    """
    try:
        return _decode(frames, max_message_bytes)
    except MalformedMessage:
        raise
    except Exception as err:  # a check this module did not foresee still must not stop the receiver
        raise MalformedMessage(f"message failed validation ({type(err).__name__}: {err})") from None


def _decode(frames: Sequence[Any], max_message_bytes: int) -> list[Trajectory]:
    if not frames:
        raise MalformedMessage("empty message: expected a header frame and tensor frames")
    sizes = list(map(_frame_nbytes, frames))
    if sum(sizes) > max_message_bytes:
        raise _fail("message bytes", sum(sizes), f"at most max_message_bytes={max_message_bytes}")
    try:
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=True, use_list=True)
    except Exception as err:  # msgpack raises several types for garbage; all mean the same here
        raise MalformedMessage(f"header frame is not valid msgpack ({type(err).__name__}: {err})") from None
    if not isinstance(header, dict) or header.keys() != HEADER_KEYS:
        keys = sorted(map(str, header)) if isinstance(header, dict) else type(header).__name__
        raise _fail("header keys", keys, f"a map with exactly {sorted(HEADER_KEYS)}")
    if type(header["schema"]) is not int or header["schema"] != SCHEMA_VERSION:
        raise _fail("header 'schema'", header["schema"], f"schema version {SCHEMA_VERSION}")
    count = header["count"]
    if type(count) is not int or not 1 <= count <= MAX_TRAJECTORIES_PER_MESSAGE:
        raise _fail("header 'count'", count, f"an integer in [1, {MAX_TRAJECTORIES_PER_MESSAGE}]")
    numels = _check_tensor_table(header["tensors"], max_message_bytes)
    if len(frames) != 1 + len(TENSOR_FIELDS):
        raise _fail("frame count", len(frames), f"{1 + len(TENSOR_FIELDS)} (header + one per tensor)")
    for (name, _, dtype), numel, size in zip(TENSOR_FIELDS, numels, sizes[1:]):
        if size != numel * dtype.itemsize:
            raise _fail(f"tensor '{name}' frame bytes", size, f"{numel} x {dtype.itemsize} = {numel * dtype.itemsize}")
    if not isinstance(header["prompt_lens"], list) or not 1 <= len(header["prompt_lens"]) <= count:
        raise _fail("header 'prompt_lens'", header["prompt_lens"], f"a list of 1 to count={count} lengths")
    num_prompts = len(header["prompt_lens"])
    prompt_lens = _int_list(header, "prompt_lens", num_prompts, 0, numels[0])
    prompt_index = _int_list(header, "prompt_index", count, 0, num_prompts - 1)
    completion_lens = _int_list(header, "completion_lens", count, 0, numels[1])
    if sum(prompt_lens) != numels[0]:
        raise _fail("sum of 'prompt_lens'", sum(prompt_lens), f"the prompt_ids length {numels[0]}")
    if sum(completion_lens) != numels[1] or numels[1] != numels[2]:
        raise _fail(
            "sum of 'completion_lens'", sum(completion_lens),
            f"completion_ids length {numels[1]} == behaviour_logprobs length {numels[2]}",
        )
    scalars = header["scalars"]
    _check_scalars(scalars, count)
    extras = header["extra"]
    _check_extra(extras, count)

    prompt_arr = _frame_array(frames[1], _INT32, numels[0])  # [sum of prompt_lens] int32
    completion_arr = _frame_array(frames[2], _INT32, numels[1])  # [sum of completion_lens] int32
    logprob_arr = _frame_array(frames[3], _FLOAT32, numels[2])  # [sum of completion_lens] float32
    for name, ids in (("prompt_ids", prompt_arr), ("completion_ids", completion_arr)):
        if ids.size and ids.min() < 0:
            raise _fail(f"{name} minimum", int(ids.min()), "token ids >= 0")
    # x.x is NaN or inf when any x is (one BLAS call); it can also overflow on huge finite values,
    # which the exact check then clears.
    with np.errstate(over="ignore"):
        squares = logprob_arr.dot(logprob_arr)
    if not math.isfinite(squares):
        finite = np.isfinite(logprob_arr)
        if not finite.all():
            raise _fail("behaviour_logprobs value", float(logprob_arr[~finite][0]), "finite logprobs")
    prompt_flat, completion_flat, logprob_flat = (
        torch.from_numpy(prompt_arr), torch.from_numpy(completion_arr), torch.from_numpy(logprob_arr)
    )

    if count == 1:  # the frames are the one trajectory's tensors: no views to cut
        reward, advantage, group, sample, version, worker, reason = (scalars[n][0] for n in _SCALAR_NAMES)
        extra = extras[0]
        return [_trusted_trajectory(
            prompt_flat, completion_flat, logprob_flat, float(reward), float(advantage), group, sample, version,
            reason, worker, {k: float(v) for k, v in extra.items()} if extra else {},
        )]
    prompts = prompt_flat.split_with_sizes(prompt_lens) if num_prompts > 1 else (prompt_flat,)  # one view each
    completions = completion_flat.split_with_sizes(completion_lens)
    logprobs = logprob_flat.split_with_sizes(completion_lens)
    return [
        _trusted_trajectory(
            prompts[p], completion, logprob, float(reward), float(advantage), group, sample, version, reason, worker,
            {k: float(v) for k, v in extra.items()} if extra else {},
        )
        for p, completion, logprob, reward, advantage, group, sample, version, reason, worker, extra in zip(
            prompt_index, completions, logprobs, scalars["reward"], scalars["advantage"], scalars["group_id"],
            scalars["sample_index"], scalars["policy_version"], scalars["finish_reason"], scalars["worker_id"], extras,
        )
    ]
