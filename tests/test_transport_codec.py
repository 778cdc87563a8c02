"""Trajectory codec (schema 2): exact round trips, columnar decoding, and a clear MalformedMessage for
every kind of bad message."""

from __future__ import annotations

import math
import pickle
import random

import msgpack
import numpy as np
import pytest
import torch

from async_grpo.transport import codec
from async_grpo.transport.codec import SMALL_MESSAGE, MalformedMessage, UnsupportedSchema, decode, encode
from async_grpo.transport.wire_columns import (
    CODE_COLUMNS, FLOAT_COLUMNS, INDEX_COLUMNS, INT_COLUMNS, column_bytes, column_struct, column_views,
)
from async_grpo.transport.trajectory import FINISH_REASONS, Trajectory
from async_grpo.transport.trajectory_batch import TrajectoryBatch

LIMIT = 1 << 20


def random_trajectory(rng: random.Random, prompt: torch.Tensor | None = None, completion_len: int | None = None) -> Trajectory:
    n = rng.randint(0, 40) if completion_len is None else completion_len
    if prompt is None:
        prompt = torch.randint(0, 50_000, (rng.randint(1, 30),), dtype=torch.int32)
    return Trajectory(
        prompt_ids=prompt,
        completion_ids=torch.randint(0, 50_000, (n,), dtype=torch.int32),
        behaviour_logprobs=-torch.rand(n) * 10,
        reward=rng.uniform(-1, 1),
        advantage=rng.uniform(-3, 3),
        group_id=rng.randint(0, 2**40),
        sample_index=rng.randint(0, 15),
        policy_version=rng.randint(0, 10_000),
        finish_reason=rng.choice(FINISH_REASONS),
        worker_id=rng.randint(0, 255),
        extra={"len_ratio": rng.random(), "format_ok": 1.0} if rng.random() < 0.5 else {},
    )


def assert_same(a, b) -> None:
    assert torch.equal(a.prompt_ids, b.prompt_ids) and b.prompt_ids.dtype == torch.int32
    assert torch.equal(a.completion_ids, b.completion_ids) and b.completion_ids.dtype == torch.int32
    assert torch.equal(a.behaviour_logprobs, b.behaviour_logprobs) and b.behaviour_logprobs.dtype == torch.float32
    for name in ("reward", "advantage", "group_id", "sample_index", "policy_version", "finish_reason", "worker_id",
                 "extra"):
        assert getattr(a, name) == getattr(b, name), name
        assert type(getattr(a, name)) is type(getattr(b, name)), name


def with_column(frames: list[bytes], name: str, row: int, value) -> list[bytes]:
    """The message with one entry of one binary column replaced."""
    header = msgpack.unpackb(frames[0])
    count, prompts = header["count"], header["prompts"]
    data = bytearray(header["column_data"])
    floats, ints, index, codes = column_views(data, count, prompts)
    if name in FLOAT_COLUMNS:
        floats[FLOAT_COLUMNS.index(name), row] = value
    elif name in INT_COLUMNS:
        ints[INT_COLUMNS.index(name), row] = value
    elif name in INDEX_COLUMNS:
        starts = {"completion_lens": 0, "prompt_lens": count, "prompt_index": count + prompts,
                  "extra_index": 2 * count + prompts}
        index[starts[name] + row] = value
    else:
        assert name in CODE_COLUMNS
        codes[row] = value
    header["column_data"] = bytes(data)
    return [msgpack.packb(header), *frames[1:]]


def schema1_message(traj: Trajectory) -> list[bytes]:
    """One trajectory in the previous wire format (schema 1: scalars as msgpack lists)."""
    header = {
        "schema": 1, "count": 1,
        "tensors": [["prompt_ids", "int32", [traj.prompt_ids.numel()]],
                    ["completion_ids", "int32", [traj.completion_ids.numel()]],
                    ["behaviour_logprobs", "float32", [traj.completion_ids.numel()]]],
        "prompt_lens": [traj.prompt_ids.numel()], "prompt_index": [0],
        "completion_lens": [traj.completion_ids.numel()],
        "scalars": {"reward": [traj.reward], "advantage": [traj.advantage], "group_id": [traj.group_id],
                    "sample_index": [traj.sample_index], "policy_version": [traj.policy_version],
                    "worker_id": [traj.worker_id], "finish_reason": [traj.finish_reason]},
        "extra": [traj.extra],
    }
    tensors = (traj.prompt_ids, traj.completion_ids, traj.behaviour_logprobs)
    return [msgpack.packb(header), *(t.numpy().tobytes() for t in tensors)]  # schema 1: a frame per tensor


def test_round_trip_of_single_trajectories_of_many_shapes_is_exact():
    rng = random.Random(0)
    torch.manual_seed(0)
    shapes = [(1, 0), (1, 1), (7, 0), (30, 40), (513, 1025)]
    for prompt_len, completion_len in shapes + [(rng.randint(1, 64), rng.randint(0, 64)) for _ in range(50)]:
        traj = random_trajectory(rng, torch.randint(0, 9, (prompt_len,), dtype=torch.int32), completion_len)
        (back,) = decode(encode(traj), LIMIT).views()
        assert_same(traj, back)


def test_batched_round_trip_sends_a_shared_prompt_once_and_keeps_order():
    rng = random.Random(1)
    shared = torch.arange(100, dtype=torch.int32)
    group = [random_trajectory(rng, shared) for _ in range(8)] + [random_trajectory(rng) for _ in range(3)]
    group[2] = random_trajectory(rng, shared, completion_len=0)  # an empty completion inside a batch
    frames = encode(group)
    header = msgpack.unpackb(frames[0])
    assert (header["count"], header["prompts"]) == (11, 4)
    assert len(header["column_data"]) == column_bytes(11, 4) == 61 * 11 + 4 * 4
    batch = decode(frames, LIMIT)
    assert batch.prompt_lens.tolist() == [100] + [t.prompt_ids.numel() for t in group[8:]]
    assert batch.prompt_index.tolist() == [0] * 8 + [1, 2, 3]
    assert batch.completion_lens.tolist() == [t.completion_ids.numel() for t in group]
    views = batch.views()
    assert len(views) == 11
    for a, b in zip(group, views):
        assert_same(a, b)
    assert all(v.prompt_ids is views[0].prompt_ids for v in views[:8])  # one tensor per distinct prompt


def test_extra_maps_are_sent_once_per_distinct_map_with_a_row_index():
    rng = random.Random(2)
    shared_map = {"reward_failures": 3.0, "reward_timeouts": 1.0}
    group = [random_trajectory(rng) for _ in range(6)]
    for i, traj in enumerate(group):
        traj.extra = shared_map if i < 4 else ({} if i == 4 else {"other": 2.5})
    header = msgpack.unpackb(encode(group)[0])
    assert header["extras"] == [shared_map, {}, {"other": 2.5}]
    batch = decode(encode(group), LIMIT)
    assert batch.extra_index.tolist() == [0, 0, 0, 0, 1, 2]
    assert [v.extra for v in batch.views()] == [shared_map] * 4 + [{}, {"other": 2.5}]


def test_group_built_as_columns_encodes_as_views_of_its_tensors_and_round_trips():
    batch = TrajectoryBatch.from_group(
        [5, 6, 7], [[8, 9], [], [10]], [[-0.5, -0.25], [], [-1.0]], [1.0, 0.0, 0.5], [0.75, -1.25, 0.5],
        group_id=9, sample_indices=[0, 1, 2], policy_versions=[4, 4, 5], finish_reasons=["stop", "abort", "length"],
        worker_id=3, extra={"reward_failures": 1.0})
    frames = encode(batch)
    assert frames[1].ctypes.data == batch.token_ids.data_ptr()  # packed: sent without a copy
    assert frames[2].ctypes.data == batch.behaviour_logprobs.data_ptr()
    assert np.frombuffer(frames[1], dtype=np.int32).tolist() == [5, 6, 7, 8, 9, 10]  # prompt, then completions
    back = decode([bytes(memoryview(f).cast("B")) for f in frames], LIMIT).views()
    assert [v.completion_ids.tolist() for v in back] == [[8, 9], [], [10]]
    assert [v.behaviour_logprobs.tolist() for v in back] == [[-0.5, -0.25], [], [-1.0]]
    assert [v.prompt_ids.tolist() for v in back] == [[5, 6, 7]] * 3
    assert [(v.reward, v.advantage, v.sample_index, v.policy_version, v.finish_reason) for v in back] == [
        (1.0, 0.75, 0, 4, "stop"), (0.0, -1.25, 1, 4, "abort"), (0.5, 0.5, 2, 5, "length")]
    assert {(v.group_id, v.worker_id) for v in back} == {(9, 3)}
    assert back[0].extra == {"reward_failures": 1.0} and back[2].num_tokens == 4


def test_concatenated_groups_round_trip_as_one_message_in_order():
    rng = random.Random(4)
    shared = torch.arange(5, dtype=torch.int32)
    first = [random_trajectory(rng, shared) for _ in range(3)]
    second = [random_trajectory(rng) for _ in range(4)]
    batches = [decode(encode(first), LIMIT), decode(encode(second), LIMIT).select(np.array([3, 0, 2]))]
    joined = TrajectoryBatch.concat(batches)
    assert joined.packed and len(joined) == 6
    assert joined.prompt_lens.tolist() == [5] + [t.prompt_ids.numel() for t in (second[0], second[2], second[3])]
    assert joined.prompt_index.tolist() == [0, 0, 0, 3, 1, 2]  # only the prompts its rows use, in prompt order
    back = decode(encode(joined), LIMIT).views()
    for a, b in zip(first + [second[3], second[0], second[2]], back):
        assert_same(a, b)


def test_selected_rows_re_encode_to_exactly_those_trajectories():
    rng = random.Random(3)
    group = [random_trajectory(rng) for _ in range(9)]
    batch = decode(encode(group), LIMIT)
    picked = batch.select(np.array([7, 2, 4]))
    assert not picked.packed
    for a, b in zip([group[7], group[2], group[4]], decode(encode(picked), LIMIT).views()):
        assert_same(a, b)
    for a, b in zip(group[3:5], batch.rows(3, 5).views()):
        assert_same(a, b)


def test_trajectory_accepts_lists_and_rejects_mismatched_lengths():
    traj = Trajectory([1, 2], [3], [-0.5], 1, 0, 0, 0, 0, "stop", 0)
    assert traj.prompt_ids.dtype == torch.int32 and traj.behaviour_logprobs.dtype == torch.float32
    assert traj.num_tokens == 3
    with pytest.raises(ValueError, match="2 values but completion_ids has 1"):
        Trajectory([1], [3], [-0.5, -0.1], 1.0, 0.0, 0, 0, 0, "stop", 0)
    with pytest.raises(ValueError, match="'halt'"):
        Trajectory([1], [3], [-0.5], 1.0, 0.0, 0, 0, 0, "halt", 0)
    with pytest.raises(ValueError, match="'reward' = nan"):
        Trajectory([1], [3], [-0.5], math.nan, 0.0, 0, 0, 0, "stop", 0)


def good_frames() -> list[bytes]:
    traj = Trajectory([5, 6, 7], [8, 9], [-0.25, -1.5], 0.5, 1.25, 3, 1, 2, "length", 4, {"m": 2.0})
    return [bytes(memoryview(f).cast("B")) for f in encode(traj)]


def with_header(**changes) -> list[bytes]:
    frames = good_frames()
    header = msgpack.unpackb(frames[0])
    header.update(changes)
    return [msgpack.packb(header), *frames[1:]]


GOOD_TENSORS = [["token_ids", "int32", [5]], ["behaviour_logprobs", "float32", [2]]]
MALFORMED = {
    "empty message": ([], "empty message"),
    "random bytes header": ([bytes(range(7, 200))] + good_frames()[1:], "msgpack|header keys"),
    "pickled trajectory": ([pickle.dumps(good_frames())], "msgpack|header keys"),
    "truncated tensor frame": (good_frames()[:2] + [good_frames()[2][:-1]], "behaviour_logprobs' frame bytes = 7"),
    "missing frame": (good_frames()[:2], "frame count = 2"),
    "extra frame": (good_frames() + [b"x"], "frame count = 4"),
    "unknown schema": (with_header(schema=99), "unsupported schema: header 'schema' = 99"),
    "float schema": (with_header(schema=2.0), "unsupported schema: header 'schema' = 2.0"),
    "schema 1 message": (schema1_message(Trajectory([1], [2], [-0.5], 1.0, 0.0, 0, 0, 0, "stop", 0)),
                         "unsupported schema: header 'schema' = 1"),
    "missing key": ([msgpack.packb({"schema": 2, "count": 1}), *good_frames()[1:]], "header keys"),
    "wrong dtype": (with_header(tensors=[["token_ids", "float64", [5]], *GOOD_TENSORS[1:]]), "names/dtypes"),
    "old tensor names": (with_header(tensors=[["prompt_ids", "int32", [3]], *GOOD_TENSORS[1:]]), "names/dtypes"),
    "shape mismatch": (with_header(tensors=[["token_ids", "int32", [6]], *GOOD_TENSORS[1:]]), "frame bytes = 20"),
    "huge declared size": (with_header(tensors=[["token_ids", "int32", [10**15]], *GOOD_TENSORS[1:]]),
                           "declared bytes"),
    "count too big": (with_header(count=2), "'column_data' bytes = 65"),
    "zero prompts": (with_header(prompts=0), "'prompts' = 0"),
    "column layout changed": (with_header(columns="reward:float32"), "'columns'"),
    "column data not bytes": (with_header(column_data="x" * 65), "'column_data' bytes = 'str'"),
    "nan reward": (with_column(good_frames(), "reward", 0, math.nan), "column 'reward'\\[0\\] = nan"),
    "inf advantage": (with_column(good_frames(), "advantage", 0, math.inf), "column 'advantage'\\[0\\] = inf"),
    "negative version": (with_column(good_frames(), "policy_version", 0, -1), "'policy_version'\\[0\\] = -1"),
    "negative group id": (with_column(good_frames(), "group_id", 0, -2**40), "'group_id'\\[0\\] = -1099511627776"),
    "unknown finish code": (with_column(good_frames(), "finish_code", 0, 7), "'finish_code'\\[0\\] = 7"),
    "prompt index out of range": (with_column(good_frames(), "prompt_index", 0, 1), "'prompt_index'\\[0\\] = 1"),
    "extra index out of range": (with_column(good_frames(), "extra_index", 0, 1), "'extra_index'\\[0\\] = 1"),
    "negative completion length": (with_column(good_frames(), "completion_lens", 0, -1), "'completion_lens'\\[0\\] = -1"),
    "lengths disagree": (with_column(good_frames(), "completion_lens", 0, 1), "sum of 'completion_lens' = 1"),
    "prompt lengths disagree": (with_column(good_frames(), "prompt_lens", 0, 2), "sum of 'prompt_lens' = 2"),
    "nan extra metric": (with_header(extras=[{"m": math.nan}]), "'m'\\] = nan"),
    "too many extra maps": (with_header(extras=[{}, {}]), "'extras'"),
    "extra key not a string": (with_header(extras=[{"m" * 200: 1.0}]), "key"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_decode_rejects_malformed_message_with_reason(case):
    frames, reason = MALFORMED[case]
    with pytest.raises(MalformedMessage, match=reason):
        decode(frames, LIMIT)


def test_other_schema_versions_are_refused_as_unsupported_schema():
    for frames in (MALFORMED["schema 1 message"][0], MALFORMED["unknown schema"][0]):
        with pytest.raises(UnsupportedSchema):
            decode(frames, LIMIT)
    with pytest.raises(MalformedMessage) as caught:
        decode(MALFORMED["nan reward"][0], LIMIT)
    assert not isinstance(caught.value, UnsupportedSchema)


def test_decode_rejects_nan_logprob_and_negative_token_id():
    frames = good_frames()
    logprobs = np.frombuffer(frames[2], dtype=np.float32).copy()
    logprobs[1] = np.nan
    with pytest.raises(MalformedMessage, match="behaviour_logprobs value = nan"):
        decode(frames[:2] + [logprobs.tobytes()], LIMIT)
    for ids, reason in (([5, -6, 7, 8, 9], "prompt_ids\\[1\\] = -6"), ([5, 6, 7, 8, -9], "completion_ids\\[1\\] = -9")):
        with pytest.raises(MalformedMessage, match=reason):
            decode([frames[0], np.array(ids, dtype=np.int32).tobytes(), frames[2]], LIMIT)


def test_decode_rejects_message_over_the_byte_limit_before_parsing():
    frames = good_frames()
    size = sum(len(f) for f in frames)
    assert len(decode(frames, size)) == 1
    with pytest.raises(MalformedMessage, match=f"message bytes = {size}: expected at most max_message_bytes={size - 1}"):
        decode(frames, size - 1)


def test_column_struct_reads_a_block_as_its_columns_in_block_order():
    rng = random.Random(6)
    for count, prompts in ((1, 1), (3, 2), (8, 1), (32, 32)):
        data = np.frombuffer(rng.randbytes(column_bytes(count, prompts)), np.uint8)
        floats, ints, index, codes = column_views(data, count, prompts)
        values = column_struct(count, prompts).unpack(data)
        assert np.array_equal(values[: 2 * count], floats.ravel(), equal_nan=True)  # random bytes may be NaNs
        assert values[2 * count : 6 * count] == tuple(ints.ravel().tolist())
        assert values[6 * count : 9 * count + prompts] == tuple(index.tolist())
        assert values[9 * count + prompts :] == tuple(codes.tolist())


def mutated(frames: list[bytes], rng: random.Random) -> list[bytes]:
    """The message with one random change: a byte of a frame, or one entry of a column set to an edge value."""
    kind = rng.randrange(4)
    if kind == 0:  # anywhere: header, tokens or logprobs
        index = rng.randrange(3)
        frame = bytearray(frames[index])
        if frame:
            frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
        return [*frames[:index], bytes(frame), *frames[index + 1 :]]
    header = msgpack.unpackb(frames[0])
    count, prompts = header["count"], header["prompts"]
    if kind == 1:  # a byte of the column block
        data = bytearray(header["column_data"])
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        header["column_data"] = bytes(data)
        return [msgpack.packb(header), *frames[1:]]
    if kind == 2:  # a header field
        key = rng.choice(["count", "prompts", "tensors", "extras"])
        header[key] = rng.choice([
            0, count - 1, count + 1, prompts + 1, -1, 2**40, 1.0, "x", [], [{}], [{"m": math.inf}],
            [["token_ids", "int32", [count]], ["behaviour_logprobs", "float32", [1]]],
        ])
        return [msgpack.packb(header), *frames[1:]]
    name = rng.choice(FLOAT_COLUMNS + INT_COLUMNS + INDEX_COLUMNS + CODE_COLUMNS)
    rows = prompts if name == "prompt_lens" else count
    if name in FLOAT_COLUMNS:
        value = rng.choice([math.nan, math.inf, -math.inf, 1e308, -0.0])
    elif name in CODE_COLUMNS:
        value = rng.choice([0, len(FINISH_REASONS) - 1, len(FINISH_REASONS), 255])
    else:
        value = rng.choice([-1, 0, 1, count, prompts, 2**31 - 1, -(2**31)])
    return with_column(frames, name, rng.randrange(rows), value)


def same_batch(a: TrajectoryBatch, b: TrajectoryBatch) -> bool:
    return (torch.equal(a.token_ids, b.token_ids) and torch.equal(a.behaviour_logprobs, b.behaviour_logprobs)
            and all(np.array_equal(getattr(a, n), getattr(b, n), equal_nan=True) for n in FLOAT_COLUMNS)
            and all(np.array_equal(getattr(a, n), getattr(b, n)) for n in
                    ("group_id", "sample_index", "policy_version", "worker_id", "completion_lens", "prompt_lens",
                     "prompt_index", "extra_index", "finish_code"))
            and a.extras == b.extras and len(a) == len(b))


def shortcut(frames: list) -> TrajectoryBatch | None:
    """What decode's shortcut checks make of a message (None: left to the full checks)."""
    try:
        return codec._accept_small(frames, codec._parse_header(frames, LIMIT))
    except Exception:
        return None


def test_small_message_shortcut_accepts_exactly_what_the_full_checks_accept():
    """A message of at most SMALL_MESSAGE trajectories is checked by `_accept_small` first: whatever it
    accepts, the full checks accept with the same contents, and it accepts every well-formed message
    except one whose float columns overflow a sum (left to the full checks, which accept it)."""
    rng = random.Random(7)
    torch.manual_seed(7)
    accepted_mutants = 0
    for _ in range(150):
        count = rng.choice([1, 2, 3, 8, SMALL_MESSAGE, SMALL_MESSAGE + 1])
        shared = torch.randint(0, 9, (rng.randint(0, 5),), dtype=torch.int32)
        group = [random_trajectory(rng, shared if rng.random() < 0.7 else None) for _ in range(count)]
        frames = [bytes(memoryview(f).cast("B")) for f in encode(group)]
        assert (shortcut(frames) is not None) == (count <= SMALL_MESSAGE)
        for message in [frames] + [mutated(frames, rng) for _ in range(12)]:
            try:
                full = codec._decode(message, LIMIT)
            except Exception:
                full = None
            fast = shortcut(message)
            if fast is not None:
                assert full is not None and same_batch(fast, full)
                accepted_mutants += message is not frames
            elif full is not None and len(full) <= SMALL_MESSAGE:
                assert not math.isfinite(sum(full.reward.tolist() + full.advantage.tolist()))
    assert accepted_mutants > 50  # the shortcut is exercised on changed but still valid messages too


def test_decode_takes_the_full_checks_for_floats_whose_sum_overflows():
    rng = random.Random(8)
    group = [random_trajectory(rng) for _ in range(2)]
    group[0].reward, group[1].reward = 1e308, 1e308  # every value finite, their sum is not
    frames = encode(group)
    assert shortcut(frames) is None
    assert decode(frames, LIMIT).reward.tolist() == [1e308, 1e308]
