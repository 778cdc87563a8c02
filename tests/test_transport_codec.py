"""Trajectory codec: exact round trips and a clear MalformedMessage for every kind of bad message."""

from __future__ import annotations

import math
import pickle
import random

import msgpack
import numpy as np
import pytest
import torch

from async_grpo.transport.codec import MalformedMessage, decode, encode
from async_grpo.transport.trajectory import FINISH_REASONS, Trajectory

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


def assert_same(a: Trajectory, b: Trajectory) -> None:
    assert torch.equal(a.prompt_ids, b.prompt_ids) and b.prompt_ids.dtype == torch.int32
    assert torch.equal(a.completion_ids, b.completion_ids) and b.completion_ids.dtype == torch.int32
    assert torch.equal(a.behaviour_logprobs, b.behaviour_logprobs) and b.behaviour_logprobs.dtype == torch.float32
    for name in ("reward", "advantage", "group_id", "sample_index", "policy_version", "finish_reason", "worker_id",
                 "extra"):
        assert getattr(a, name) == getattr(b, name), name


def test_round_trip_of_single_trajectories_of_many_shapes_is_exact():
    rng = random.Random(0)
    torch.manual_seed(0)
    shapes = [(1, 0), (1, 1), (7, 0), (30, 40), (513, 1025)]
    for prompt_len, completion_len in shapes + [(rng.randint(1, 64), rng.randint(0, 64)) for _ in range(50)]:
        traj = random_trajectory(rng, torch.randint(0, 9, (prompt_len,), dtype=torch.int32), completion_len)
        (back,) = decode(encode(traj), LIMIT)
        assert_same(traj, back)


def test_batched_round_trip_sends_a_shared_prompt_once_and_keeps_order():
    rng = random.Random(1)
    shared = torch.arange(100, dtype=torch.int32)
    group = [random_trajectory(rng, shared) for _ in range(8)] + [random_trajectory(rng) for _ in range(3)]
    group[2] = random_trajectory(rng, shared, completion_len=0)  # an empty completion inside a batch
    frames = encode(group)
    header = msgpack.unpackb(frames[0])
    assert header["prompt_lens"] == [100] + [t.prompt_ids.numel() for t in group[8:]]
    assert header["prompt_index"] == [0] * 8 + [1, 2, 3]
    decoded = decode(frames, LIMIT)
    assert len(decoded) == 11
    for a, b in zip(group, decoded):
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
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            header[outer][inner] = value
        else:
            header[key] = value
    return [msgpack.packb(header), *frames[1:]]


def with_scalar(name: str, value) -> list[bytes]:
    frames = good_frames()
    header = msgpack.unpackb(frames[0])
    header["scalars"][name] = [value]
    return [msgpack.packb(header), *frames[1:]]


MALFORMED = {
    "empty message": ([], "empty message"),
    "random bytes header": ([bytes(range(7, 200))] + good_frames()[1:], "msgpack|header keys"),
    "pickled trajectory": ([pickle.dumps(good_frames())], "msgpack|header keys"),
    "truncated tensor frame": (good_frames()[:3] + [good_frames()[3][:-1]], "behaviour_logprobs' frame bytes = 7"),
    "missing frame": (good_frames()[:3], "frame count = 3"),
    "extra frame": (good_frames() + [b"x"], "frame count = 5"),
    "unknown schema": (with_header(schema=99), "'schema' = 99"),
    "bool schema": (with_header(schema=True), "'schema' = True"),
    "wrong dtype": (with_header(tensors=[["prompt_ids", "float64", [3]], ["completion_ids", "int32", [2]],
                                         ["behaviour_logprobs", "float32", [2]]]), "name/dtype"),
    "shape mismatch": (with_header(tensors=[["prompt_ids", "int32", [4]], ["completion_ids", "int32", [2]],
                                            ["behaviour_logprobs", "float32", [2]]]), "frame bytes = 12"),
    "huge declared size": (with_header(tensors=[["prompt_ids", "int32", [10**15]], ["completion_ids", "int32", [2]],
                                                ["behaviour_logprobs", "float32", [2]]]), "declared bytes"),
    "lengths disagree": (with_header(completion_lens=[1]), "completion_lens"),
    "prompt index out of range": (with_header(prompt_index=[1]), "prompt_index"),
    "count too big": (with_header(count=2), "a list of 2"),
    "nan reward": (with_scalar("reward", math.nan), "'reward'\\[0\\] = nan"),
    "inf advantage": (with_scalar("advantage", math.inf), "'advantage'\\[0\\] = inf"),
    "string group id": (with_scalar("group_id", "3"), "'group_id'\\[0\\]"),
    "negative version": (with_scalar("policy_version", -1), "'policy_version'\\[0\\] = -1"),
    "unknown finish reason": (with_scalar("finish_reason", "timeout"), "'timeout'"),
    "nan extra metric": (with_header(extra=[{"m": math.nan}]), "'m'\\] = nan"),
    "missing key": (with_header(scalars={"reward": [1.0]}), "'scalars' keys"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_decode_rejects_malformed_message_with_reason(case):
    frames, reason = MALFORMED[case]
    with pytest.raises(MalformedMessage, match=reason):
        decode(frames, LIMIT)


def test_decode_rejects_nan_logprob_and_negative_token_id():
    frames = good_frames()
    logprobs = np.frombuffer(frames[3], dtype=np.float32).copy()
    logprobs[1] = np.nan
    with pytest.raises(MalformedMessage, match="behaviour_logprobs value = nan"):
        decode(frames[:3] + [logprobs.tobytes()], LIMIT)
    ids = np.array([5, -6, 7], dtype=np.int32)
    with pytest.raises(MalformedMessage, match="prompt_ids minimum = -6"):
        decode([frames[0], ids.tobytes(), *frames[2:]], LIMIT)


def test_decode_rejects_message_over_the_byte_limit_before_parsing():
    frames = good_frames()
    size = sum(len(f) for f in frames)
    assert len(decode(frames, size)) == 1
    with pytest.raises(MalformedMessage, match=f"message bytes = {size}: expected at most max_message_bytes={size - 1}"):
        decode(frames, size - 1)
