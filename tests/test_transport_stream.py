"""TrajectoryStream -> TrajectoryReceiver over real ZeroMQ sockets on 127.0.0.1."""

from __future__ import annotations

import math
import pickle
import random
import threading
import time

import msgpack
import pytest
import torch
import zmq

from async_grpo.config import TransportConfig
from async_grpo.transport.codec import encode
from async_grpo.transport.trajectory_batch import TrajectoryBatch, TrajectoryView
from test_transport_codec import schema1_message, with_column
from async_grpo.transport.stream import PushTimeout, TrajectoryReceiver, TrajectoryStream
from async_grpo.transport.trajectory import Trajectory

def make_traj(index: int, completion_len: int = 4) -> Trajectory:
    return Trajectory(
        prompt_ids=torch.tensor([index % 1000, 1, 2], dtype=torch.int32),
        completion_ids=torch.full((completion_len,), index % 50_000, dtype=torch.int32),
        behaviour_logprobs=torch.full((completion_len,), -0.5),
        reward=float(index),
        advantage=0.25,
        group_id=index // 4,
        sample_index=index % 4,
        policy_version=3,
        finish_reason="stop",
        worker_id=1,
    )


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached within timeout")
        time.sleep(0.01)


def test_pushed_trajectories_arrive_in_order_with_exact_contents():
    with TrajectoryReceiver(TransportConfig()) as receiver, TrajectoryStream(receiver.endpoint, TransportConfig()) as stream:
        assert stream.push(make_traj(0), timeout=10)
        assert stream.push([make_traj(i) for i in range(1, 9)], timeout=10)  # one group, one message
        got = receiver.get_batch(9, timeout=10)
        assert [t.reward for t in got] == [float(i) for i in range(9)]
        assert torch.equal(got[5].completion_ids, torch.full((4,), 5, dtype=torch.int32))
        assert all(type(t) is TrajectoryView for t in got)  # lazy rows of the received messages
        assert receiver.get(timeout=0.05) is None
        counters = receiver.counters()
        assert (counters.received, counters.rejected, counters.accepted, counters.delivered) == (2, 0, 9, 9)
        assert (stream.counters.sent, stream.counters.messages, stream.counters.dropped) == (9, 2, 0)


def make_group_batch(group_id: int, size: int = 8) -> TrajectoryBatch:
    """A group as a worker builds it: rewards group_id * 100 + sample index."""
    return TrajectoryBatch.from_group(
        [group_id, 1, 2], [[group_id] * (i + 1) for i in range(size)], [[-0.5] * (i + 1) for i in range(size)],
        [group_id * 100.0 + i for i in range(size)], [0.25] * size, group_id=group_id, sample_indices=list(range(size)),
        policy_versions=[3] * size, finish_reasons=["stop"] * size, worker_id=1)


def test_take_batches_hands_over_whole_messages_as_columns_cut_to_the_count():
    with TrajectoryReceiver(TransportConfig()) as receiver, TrajectoryStream(receiver.endpoint, TransportConfig()) as stream:
        assert stream.push(make_group_batch(1), timeout=10) and stream.push(make_group_batch(2), timeout=10)
        wait_for(lambda: receiver.depth == 16)
        first = receiver.take_batches(12, timeout=10)
        assert [len(b) for b in first] == [8, 4] and all(type(b) is TrajectoryBatch for b in first)
        assert first[1].reward.tolist() == [200.0, 201.0, 202.0, 203.0]
        rest = receiver.take_batches(10, timeout=0.2)
        assert [len(b) for b in rest] == [4]
        assert [v.completion_ids.tolist() for v in rest[0].views()] == [[2] * 5, [2] * 6, [2] * 7, [2] * 8]
        assert [v.prompt_ids.tolist() for v in rest[0].views()] == [[2, 1, 2]] * 4
        counters = receiver.counters()
        assert (counters.received, counters.accepted, counters.delivered) == (2, 16, 16)
        assert (stream.counters.sent, stream.counters.messages) == (16, 2)


def test_queue_is_bounded_in_trajectories_and_splits_a_message_to_fill_it():
    cfg = TransportConfig(queue_size=10)
    with TrajectoryReceiver(cfg) as receiver, TrajectoryStream(receiver.endpoint, cfg) as stream:
        for group in range(3):
            assert stream.push(make_group_batch(group, size=4), timeout=10)
        wait_for(lambda: receiver.depth == 10)
        time.sleep(0.2)
        assert receiver.depth == 10  # the third message waits half in, half out
        got = receiver.get_batch(12, timeout=10)
        assert [t.reward for t in got] == [g * 100.0 + i for g in range(3) for i in range(4)]
        assert receiver.counters().dropped_full == 0


def test_single_trajectory_messages_read_in_bursts_keep_order_and_a_small_queue_bound():
    cfg = TransportConfig(queue_size=5)
    with TrajectoryReceiver(cfg) as receiver, TrajectoryStream(receiver.endpoint, cfg) as stream:
        for i in range(60):  # far more than the queue holds: they wait in ZeroMQ, read a room's worth at a time
            assert stream.push(make_traj(i), timeout=10)
        wait_for(lambda: receiver.depth == 5)
        time.sleep(0.2)
        assert receiver.depth == 5
        got = receiver.get_batch(60, timeout=10)
        assert [t.reward for t in got] == [float(i) for i in range(60)]
        counters = receiver.counters()
        assert (counters.received, counters.accepted, counters.dropped_full, counters.delivered) == (60, 60, 0, 60)


def test_drop_mode_receiver_sheds_a_burst_of_small_messages_past_the_queue_room():
    cfg = TransportConfig(queue_size=8, on_full="drop")
    with TrajectoryReceiver(cfg) as receiver, TrajectoryStream(receiver.endpoint, TransportConfig()) as stream:
        for i in range(50):
            assert stream.push(make_traj(i), timeout=10)
        wait_for(lambda: receiver.counters().received == 50)
        counters = receiver.counters()
        assert (receiver.depth, counters.accepted, counters.dropped_full) == (8, 50, 42)
        assert [t.reward for t in receiver.get_batch(50, timeout=0.2)] == [float(i) for i in range(8)]


def malformed_messages(rng: random.Random) -> list[list[bytes]]:
    """One of each kind of bad message, with random variations."""
    good = [bytes(memoryview(f).cast("B")) for f in encode(make_traj(7))]
    header = msgpack.unpackb(good[0])

    def patched(**changes) -> list[bytes]:
        h = msgpack.unpackb(good[0])
        for key, value in changes.items():
            h[key] = value
        return [msgpack.packb(h), *good[1:]]

    cut = rng.randint(0, len(good[1]) - 1)
    return [
        good[:2] + [good[2][: rng.randint(0, len(good[2]) - 1)]],  # truncated frame
        good[: rng.randint(1, 2)],  # too few frames
        good + [b"\0" * rng.randint(0, 9)],  # too many frames
        patched(tensors=[["token_ids", "int64", [7]], *header["tensors"][1:]]),  # dtype mismatch
        patched(tensors=[["token_ids", "int32", [rng.randint(8, 99)]], *header["tensors"][1:]]),  # shape mismatch
        patched(tensors=[["token_ids", "int32", [2**50]], *header["tensors"][1:]]),  # huge declared size
        [rng.randbytes(rng.randint(0, 300)) for _ in range(rng.randint(1, 5))],  # random bytes
        [pickle.dumps(make_traj(1))],  # a pickled payload must never be unpickled
        with_column(good, "reward", 0, math.nan),  # NaN reward
        with_column(good, "policy_version", 0, -rng.randint(1, 10**6)),  # negative version
        with_column(good, "finish_code", 0, rng.randint(3, 255)),  # no such finish reason
        with_column(good, "completion_lens", 0, rng.randint(5, 99)),  # lengths disagree with the frames
        patched(schema=rng.randint(3, 10**6)),  # unknown schema version
        schema1_message(make_traj(3)),  # the previous wire format: an unsupported schema
        [good[0], good[1][:cut], good[2]],  # token frame shorter than declared
    ]


def test_thousand_malformed_messages_are_rejected_and_good_ones_all_delivered():
    cfg = TransportConfig(queue_size=32)
    rng = random.Random(0)
    with TrajectoryReceiver(cfg) as receiver:
        context = zmq.Context()
        raw = context.socket(zmq.PUSH)
        raw.linger = 0
        raw.connect(receiver.endpoint)
        good_count, bad_count = 250, 1000
        plan = ["bad"] * bad_count + ["good"] * good_count
        rng.shuffle(plan)
        delivered: list[Trajectory] = []
        consumer = threading.Thread(target=lambda: delivered.extend(receiver.get_batch(good_count, timeout=30)))
        consumer.start()
        rss_before = rss_bytes()
        bad_pool: list[list[bytes]] = []
        schema_sent = 0
        good_index = 0
        for kind in plan:
            if kind == "good":
                raw.send_multipart(encode(make_traj(good_index, completion_len=good_index % 17)), copy=False)
                good_index += 1
            else:
                if not bad_pool:
                    bad_pool = malformed_messages(rng)
                    schema_kinds = bad_pool[-3:-1]  # the unknown version and the schema-1 message
                message = bad_pool.pop()
                schema_sent += any(message is k for k in schema_kinds)
                if message:
                    raw.send_multipart(message)
        consumer.join(timeout=40)
        wait_for(lambda: receiver.counters().received == bad_count + good_count)
        rss_growth = rss_bytes() - rss_before
        counters = receiver.counters()
        raw.close()
        context.term()
    assert not consumer.is_alive()
    assert (counters.received, counters.rejected, counters.accepted, counters.dropped_full) == (1250, 1000, 250, 0)
    assert counters.rejected_schema == schema_sent > 100
    assert counters.delivered == 250
    assert [t.reward for t in delivered] == [float(i) for i in range(250)]
    assert all(t.completion_ids.numel() == i % 17 for i, t in enumerate(delivered))
    assert receiver.last_rejection is not None
    assert rss_growth < 32 * 2**20, f"RSS grew by {rss_growth / 2**20:.1f} MiB"


def test_slow_consumer_makes_producer_block_not_buffer_without_bound():
    # 128 KiB per trajectory: the socket buffers plus HWMs hold only a few dozen of them.
    cfg = TransportConfig(send_hwm=2, recv_hwm=2, queue_size=4)
    with TrajectoryReceiver(cfg) as receiver, TrajectoryStream(receiver.endpoint, cfg) as stream:
        pushed = 0
        with pytest.raises(PushTimeout, match="found no room for 0.5 s"):
            while pushed < 500:
                stream.push(make_traj(pushed, completion_len=16_384), timeout=0.5)
                pushed += 1
        assert 4 <= pushed < 120, pushed
        assert receiver.depth == 4
        assert stream.counters.blocked_s >= 0.5
        drained = receiver.get_batch(pushed, timeout=20)
        assert [t.reward for t in drained] == [float(i) for i in range(pushed)]
        assert receiver.counters().dropped_full == 0


def test_drop_mode_producer_sheds_and_counts_what_it_dropped():
    stream_cfg = TransportConfig(send_hwm=2, on_full="drop")
    receiver_cfg = TransportConfig(recv_hwm=2, queue_size=4)
    with TrajectoryReceiver(receiver_cfg) as receiver, TrajectoryStream(receiver.endpoint, stream_cfg) as stream:
        wait_for(lambda: stream.push(make_traj(0, completion_len=16_384)))  # first success: connected
        dropped_while_connecting = stream.counters.dropped
        results = [stream.push(make_traj(i, completion_len=16_384)) for i in range(1, 300)]
        sent = 1 + sum(results)
        assert stream.counters.dropped - dropped_while_connecting == results.count(False) > 0
        assert stream.counters.sent == sent
        drained = receiver.get_batch(sent, timeout=20)
        assert len(drained) == sent
        assert receiver.get(timeout=0.3) is None


def test_drop_mode_receiver_counts_trajectories_shed_on_a_full_queue():
    cfg = TransportConfig(queue_size=8, on_full="drop")
    with TrajectoryReceiver(cfg) as receiver, TrajectoryStream(receiver.endpoint, TransportConfig()) as stream:
        stream.push([make_traj(i) for i in range(50)], timeout=10)
        wait_for(lambda: receiver.counters().accepted == 50)
        assert receiver.depth == 8
        assert receiver.counters().dropped_full == 42
        assert [t.reward for t in receiver.get_batch(50, timeout=0.2)] == [float(i) for i in range(8)]


def test_stream_close_does_not_hang_and_a_restarted_receiver_gets_new_pushes():
    first = TrajectoryReceiver(TransportConfig())
    port = first.port
    stream = TrajectoryStream(first.endpoint, TransportConfig(), linger_ms=200)
    assert stream.push(make_traj(0), timeout=10)
    assert first.get(timeout=10).reward == 0.0
    first.close()
    with pytest.raises(PushTimeout):  # nobody is connected: block mode waits, then times out
        time.sleep(0.2)
        stream.push(make_traj(1), timeout=0.3)
    second = TrajectoryReceiver(TransportConfig(), port=port)
    try:
        assert stream.push(make_traj(2), timeout=10)  # ZeroMQ reconnected by itself
        assert second.get(timeout=10).reward == 2.0
    finally:
        second.close()
    started = time.monotonic()
    stream.close()
    assert time.monotonic() - started < 2.0


def test_receiver_reports_a_port_it_cannot_bind():
    with TrajectoryReceiver(TransportConfig()) as receiver:
        with pytest.raises(ValueError, match=f"cannot bind the trajectory receiver to tcp://127.0.0.1:{receiver.port}"):
            TrajectoryReceiver(TransportConfig(), port=receiver.port)
