"""Zero-copy paths of the trajectory codec and stream, and the checks that kept their exact behaviour.

Decoded tensors must be views of the received ZeroMQ frames (no copy), stay valid after the frames
are dropped, and be writable; read-only input (bytes) is copied instead. The fast whole-column checks
must still name the exact bad value.
"""

from __future__ import annotations

import gc
import math
import warnings

import msgpack
import numpy as np
import pytest
import torch
import zmq

from async_grpo.config import TransportConfig
from async_grpo.transport.codec import MalformedMessage, decode, encode
from async_grpo.transport.stream import TrajectoryReceiver, TrajectoryStream
from async_grpo.transport.trajectory import Trajectory
from async_grpo.transport.trajectory_batch import TrajectoryBatch
from test_transport_codec import with_column

LIMIT = 1 << 22


def make_group(size: int, completion_len: int = 300) -> list[Trajectory]:
    prompt = torch.arange(7, 57, dtype=torch.int32)  # [50] shared by the group
    return [
        Trajectory(prompt, torch.arange(i, i + completion_len, dtype=torch.int32),
                   -torch.arange(completion_len, dtype=torch.float32) / (i + 1), float(i), -0.5, 11, i, 4, "stop", 2)
        for i in range(size)
    ]


def over_zmq(frames: list) -> list[zmq.Frame]:
    """The frames as a PULL socket hands them over (copy=False), through a real TCP connection."""
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    push = context.socket(zmq.PUSH)
    try:
        push.connect(f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}")
        push.send_multipart(frames, copy=False)
        assert pull.poll(10_000), "message did not arrive"
        return pull.recv_multipart(copy=False)
    finally:
        push.close(linger=1000)
        pull.close(linger=0)
        context.term()


def frame_address(frame: zmq.Frame) -> int:
    return np.frombuffer(frame, dtype=np.uint8).ctypes.data


def test_decoded_tensors_are_views_of_the_received_frames_and_outlive_them():
    group = make_group(3)
    frames = over_zmq(encode(group))
    batch = decode(frames, LIMIT)
    decoded = batch.views()
    assert decoded[0].prompt_ids.data_ptr() == frame_address(frames[1])
    assert decoded[0].completion_ids.data_ptr() == frame_address(frames[1]) + 50 * 4  # after the one prompt
    assert decoded[2].completion_ids.data_ptr() == frame_address(frames[1]) + (50 + 2 * 300) * 4
    assert decoded[1].behaviour_logprobs.data_ptr() == frame_address(frames[2]) + 300 * 4
    resent = encode(batch)  # learner rank 0 sharing a decoded message: the received memory, sent again
    assert (resent[1].ctypes.data, resent[2].ctypes.data) == (frame_address(frames[1]), frame_address(frames[2]))
    assert all(t.prompt_ids.data_ptr() == decoded[0].prompt_ids.data_ptr() for t in decoded)  # sent once, one view
    del frames
    gc.collect()
    churn = [np.full(1 << 16, -1, dtype=np.int32) for _ in range(64)]  # reuses freed memory, were it freed
    for sent, got in zip(group, decoded):
        assert torch.equal(sent.completion_ids, got.completion_ids)
        assert torch.equal(sent.behaviour_logprobs, got.behaviour_logprobs)
        assert torch.equal(sent.prompt_ids, got.prompt_ids)
    decoded[0].completion_ids[0] = 99  # writable: the learner may modify what it got
    assert decoded[0].completion_ids[0] == 99 and len(churn) == 64


def test_group_built_as_columns_is_encoded_as_views_of_its_tensors():
    batch = TrajectoryBatch.from_group(
        list(range(7, 57)), [list(range(i, i + 300)) for i in range(3)], [[-0.5] * 300] * 3, [0.0, 1.0, 2.0],
        [-0.5] * 3, group_id=11, sample_indices=[0, 1, 2], policy_versions=[4] * 3, finish_reasons=["stop"] * 3,
        worker_id=2)
    frames = encode(batch)
    assert frames[1].ctypes.data == batch.token_ids.data_ptr()
    assert frames[2].ctypes.data == batch.behaviour_logprobs.data_ptr()
    assert np.frombuffer(msgpack.unpackb(frames[0])["column_data"], np.uint8).tobytes() == bytes(batch.wire_columns)


def test_read_only_frames_are_copied_into_writable_tensors_without_warnings():
    group = make_group(2)
    frames = [bytes(memoryview(f).cast("B")) for f in encode(group)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a tensor over a read-only buffer
        decoded = decode(frames, LIMIT).views()
    decoded[1].behaviour_logprobs.zero_()
    assert torch.equal(decode(frames, LIMIT).view(1).behaviour_logprobs, group[1].behaviour_logprobs)


def test_empty_completions_and_a_single_empty_completion_decode_to_empty_tensors():
    group = make_group(2, completion_len=0)
    for items in (group, group[:1]):
        decoded = decode(over_zmq(encode(items)), LIMIT).views()
        assert [t.completion_ids.shape for t in decoded] == [(0,)] * len(items)
        assert [t.behaviour_logprobs.dtype for t in decoded] == [torch.float32] * len(items)


def test_huge_finite_logprobs_pass_and_infinite_ones_are_named():
    (traj,) = make_group(1, completion_len=3)
    traj.behaviour_logprobs = torch.tensor([-1e30, -3e38, 0.0])  # squares overflow float32, values are finite
    (back,) = decode(over_zmq(encode(traj)), LIMIT).views()
    assert torch.equal(back.behaviour_logprobs, traj.behaviour_logprobs)
    traj.behaviour_logprobs = torch.tensor([-1.0, -math.inf, 0.0])
    with pytest.raises(MalformedMessage, match="behaviour_logprobs value = -inf"):
        decode(encode(traj), LIMIT)


@pytest.mark.parametrize(
    ("name", "bad_index", "value", "reason"),
    [
        ("advantage", 1, math.nan, "column 'advantage'\\[1\\] = nan"),
        ("reward", 2, -math.inf, "column 'reward'\\[2\\] = -inf"),
        ("worker_id", 2, -3, "column 'worker_id'\\[2\\] = -3"),
        ("sample_index", 1, -2**63, "column 'sample_index'\\[1\\] = -9223372036854775808"),
        ("prompt_index", 2, 1, "column 'prompt_index'\\[2\\] = 1"),
        ("finish_code", 1, 3, "column 'finish_code'\\[1\\] = 3"),
    ],
)
def test_column_checks_name_the_first_bad_value_of_a_group(name, bad_index, value, reason):
    frames = [bytes(memoryview(f).cast("B")) for f in encode(make_group(3))]
    with pytest.raises(MalformedMessage, match=reason):
        decode(with_column(frames, name, bad_index, value), LIMIT)


def test_huge_finite_columns_pass_the_one_call_finiteness_check():
    group = make_group(2)
    group[0].reward, group[1].advantage = 1e300, -1e300  # the squares' sum overflows; every value is finite
    (first, second) = decode(encode(group), LIMIT).views()
    assert (first.reward, second.advantage) == (1e300, -1e300)


def test_push_of_a_group_over_the_message_limit_is_split_into_the_fewest_messages():
    # 300-token completions with a 50-token prompt: 4 * (50 + 600) = 2600 bytes each as counted by the
    # splitter; a 0.01 MiB limit leaves 0.9 * 10485.76 = 9437 bytes of tensors: 3 trajectories per message.
    cfg = TransportConfig(max_message_mb=0.01)
    group = make_group(8)
    with TrajectoryReceiver(cfg) as receiver, TrajectoryStream(receiver.endpoint, cfg) as stream:
        assert stream.push(group, timeout=10)
        got = receiver.get_batch(8, timeout=10)
        assert (stream.counters.messages, stream.counters.sent) == (3, 8)
        assert receiver.counters().received == 3
        assert [t.reward for t in got] == [float(i) for i in range(8)]
        assert all(torch.equal(a.completion_ids, b.completion_ids) for a, b in zip(group, got))
        assert stream.push(group[:3], timeout=10)  # exactly at the limit: one message
        assert len(receiver.get_batch(3, timeout=10)) == 3
        assert stream.counters.messages == 4


def test_stream_byte_counter_counts_header_and_tensor_bytes_exactly():
    group = make_group(4)
    expected = sum(memoryview(f).nbytes for f in encode(group))
    with TrajectoryReceiver(TransportConfig()) as receiver, TrajectoryStream(receiver.endpoint, TransportConfig()) as stream:
        assert stream.push(group, timeout=10)
        assert len(receiver.get_batch(4, timeout=10)) == 4
    assert stream.counters.bytes == expected
