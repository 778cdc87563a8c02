"""Weight packing, sync-group layout, and the broadcast to worker groups over real gloo process groups.

The multi-process tests run world = 1 learner + 3 worker ranks (a group of 1 and a group of 2) as four
spawned processes on 127.0.0.1, with explicit timeouts so a hang fails the test.
"""

from __future__ import annotations

import multiprocessing
import queue
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from async_grpo.config import TransportConfig
from async_grpo.transport.control import WeightsListener
from async_grpo.transport.endpoints import open_learner_sockets, read_endpoints
from async_grpo.transport.sync_groups import SyncGroupSpec, make_sync_groups, sync_group_layout
from async_grpo.transport import weights as weights_module
from async_grpo.transport.weight_buckets import (
    decode_header,
    encode_header,
    pack_weights,
    pack_weights_into,
    unpack_buckets,
)
from async_grpo.transport.weights import SyncTimeout, WeightPublisher, WeightReceiver

BUCKET_MB = 0.001  # ~1 KiB: several buckets even for the tiny test model


def model_weights(version: int) -> dict[str, torch.Tensor]:
    """A deterministic 'model' per version with every dtype and shape kind the packer must handle."""
    gen = torch.Generator().manual_seed(version)
    return {
        "embed.weight": torch.randn(40, 16, generator=gen).to(torch.bfloat16),  # 1280 B: larger than a bucket
        "layers.0.norm.weight": torch.randn(16, generator=gen),
        "layers.0.mlp.weight": torch.randn(16, 8, generator=gen).t(),  # non-contiguous
        "layers.0.scale": torch.tensor(float(version)),  # 0-d
        "layers.0.empty": torch.empty(0, 4),
        "head.weight": torch.randn(8, 16, generator=gen).to(torch.bfloat16),
        "rope.positions": torch.arange(version, version + 10, dtype=torch.int64),
        "mask": torch.rand(5, generator=gen) > 0.5,
    }


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_pack_and_unpack_round_trip_bit_exact_with_per_dtype_buckets():
    weights = model_weights(3)
    buckets = pack_weights(weights.items(), bucket_bytes=1024)
    # fp32: norm 16 + mlp 128 + scale 1 + empty 0 = 145 elements (580 B) fit one 256-element bucket.
    # bf16: embed (640 elements) overflows the 512-element bucket size and gets its own; head (128) opens the next.
    layout = [(b.dtype, b.data.numel(), [name for name, _, _ in b.entries]) for b in buckets]
    assert layout == [
        (torch.bfloat16, 640, ["embed.weight"]),
        (torch.float32, 145, ["layers.0.norm.weight", "layers.0.mlp.weight", "layers.0.scale", "layers.0.empty"]),
        (torch.bfloat16, 128, ["head.weight"]),
        (torch.int64, 10, ["rope.positions"]),
        (torch.bool, 5, ["mask"]),
    ]
    specs = decode_header(encode_header(3, buckets), version=3, num_buckets=len(buckets))
    back = unpack_buckets(specs, [b.data.clone() for b in buckets])
    assert list(back) == list(weights)
    assert all(bit_equal(weights[name], back[name]) for name in weights)


def test_pack_rejects_duplicate_names_and_header_rejects_wrong_version():
    with pytest.raises(ValueError, match="'w' appears twice"):
        pack_weights([("w", torch.zeros(2)), ("w", torch.zeros(2))], bucket_bytes=64)
    header = encode_header(5, pack_weights([("w", torch.zeros(2))], bucket_bytes=64))
    with pytest.raises(ValueError, match="weight header version 5: expected 6"):
        decode_header(header, version=6, num_buckets=1)


def one_pass(named: dict[str, torch.Tensor]):
    """The export as the learner yields it: a generator that can be read once."""
    yield from named.items()


def test_pack_into_refills_the_same_buckets_when_the_layout_repeats():
    first = pack_weights_into(one_pass(model_weights(1)), None, bucket_bytes=1024)
    pointers = [b.data.data_ptr() for b in first.buckets]
    again = pack_weights_into(one_pass(model_weights(2)), first, bucket_bytes=1024)
    assert again is first and [b.data.data_ptr() for b in again.buckets] == pointers
    specs = decode_header(encode_header(2, again.buckets), version=2, num_buckets=len(again.buckets))
    back = unpack_buckets(specs, [b.data for b in again.buckets])
    expected = model_weights(2)
    assert list(back) == list(expected) and all(bit_equal(back[k], expected[k]) for k in expected)


@pytest.mark.parametrize("change", ["reshaped", "retyped", "renamed", "added", "removed"])
def test_pack_into_packs_afresh_and_exactly_when_the_layout_changes(change):
    previous = pack_weights_into(one_pass(model_weights(1)), None, bucket_bytes=1024)
    weights = model_weights(2)
    if change == "reshaped":
        weights["head.weight"] = weights["head.weight"].reshape(16, 8)
    elif change == "retyped":
        weights["layers.0.norm.weight"] = weights["layers.0.norm.weight"].double()
    elif change == "renamed":
        weights = {("head.w" if k == "head.weight" else k): v for k, v in weights.items()}
    elif change == "added":
        weights["tail.bias"] = torch.arange(3.0)
    else:
        del weights["mask"]
    packed = pack_weights_into(one_pass(weights), previous, bucket_bytes=1024)
    assert packed is not previous
    specs = decode_header(encode_header(2, packed.buckets), version=2, num_buckets=len(packed.buckets))
    back = unpack_buckets(specs, [b.data for b in packed.buckets])
    assert sorted(back) == sorted(weights) and all(bit_equal(back[k], weights[k]) for k in weights)
    assert [name for name, *_ in packed.slots] == list(weights)  # export order kept for the next refill


def test_pack_into_still_rejects_a_duplicate_name_after_a_reused_prefix():
    previous = pack_weights_into(one_pass({"a": torch.zeros(2), "b": torch.ones(2)}), None, bucket_bytes=64)
    with pytest.raises(ValueError, match="'a' appears twice"):
        pack_weights_into([("a", torch.zeros(2)), ("a", torch.ones(2))], previous, bucket_bytes=64)


def test_sync_group_layout_pairs_learner_rank_zero_with_each_worker_group():
    assert sync_group_layout(world_size=7, num_learner_ranks=3, tp_size=2) == [
        SyncGroupSpec(0, "sync-0", (0, 3, 4)),
        SyncGroupSpec(1, "sync-1", (0, 5, 6)),
    ]
    with pytest.raises(ValueError, match="leaves 3 worker ranks: expected a positive multiple of workers.tp_size = 2"):
        sync_group_layout(world_size=5, num_learner_ranks=2, tp_size=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GROUPS = {"sync-a": [0, 1], "sync-b": [0, 2, 3]}


def run_rank(rank: int, port: int, scenario: str, results: multiprocessing.Queue) -> None:
    """One process of the 4-rank job; puts a dict of findings on `results`."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size=4, is_master=rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=4, timeout=timedelta(seconds=60))
    report: dict = {"rank": rank}
    try:
        # The job's own helper, tp_size=1: three groups; every rank must call it.
        report["made"] = sorted(make_sync_groups(4, 1, 1, "gloo", timeout=5.0))
        timeout_s = 2.0 if scenario == "dead_group" else 30.0
        groups = {name: dist.new_group(ranks, backend="gloo", timeout=timedelta(seconds=timeout_s))
                  for name, ranks in GROUPS.items()}
        mine = next(name for name, ranks in GROUPS.items() if rank in ranks and rank != 0) if rank else None
        cfg = TransportConfig(bind_host="127.0.0.1")
        if rank == 0:
            sockets = open_learner_sockets(cfg, store)
            publisher = WeightPublisher(groups, bucket_mb=BUCKET_MB, timeout_s=timeout_s, announcer=sockets.announcer)
            started = time.monotonic()
            publisher.publish(1, model_weights(1).items())
            assert publisher.wait_idle(timeout=30)
            report["first_done_s"] = time.monotonic() - started
            publisher.publish(2, model_weights(2).items())
            assert publisher.wait_idle(timeout=30)
            report["status"] = {name: (s.sent_version, s.dead, s.error) for name, s in publisher.status().items()}
            publisher.close()
            sockets.close()
        elif scenario == "dead_group" and mine == "sync-b":
            pass  # alive, but never joins a broadcast
        else:
            endpoints = read_endpoints(store, timeout_s=30)
            listener = WeightsListener(endpoints.control, mine, cfg)
            receiver = WeightReceiver(groups[mine], src_rank=0, timeout_s=timeout_s, name=mine)
            received = []
            for _ in range(2):
                deadline = time.monotonic() + 30
                announced = None
                while announced is None and time.monotonic() < deadline:
                    announced = listener.poll()
                    time.sleep(0.01)
                version, weights = receiver.receive(expected_version=announced)
                expected = model_weights(version)
                received.append((announced, version, list(weights) == list(expected)
                                 and all(bit_equal(weights[k], expected[k]) for k in expected)))
            report["received"] = received
            if scenario == "dead_group":
                try:
                    receiver.receive(timeout=1.0, expected_version=3)
                except SyncTimeout as err:
                    report["receiver_timeout"] = str(err)
            listener.close()
        dist.barrier()  # ranks that skip broadcasts stay alive until the learner is done with them
    except BaseException as err:  # reported, so the parent shows the real failure
        report["error"] = repr(err)
    results.put(report)
    dist.destroy_process_group()


def run_job(scenario: str) -> dict[int, dict]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=run_rank, args=(r, port, scenario, results), daemon=True) for r in range(4)]
    for p in procs:
        p.start()
    reports: dict[int, dict] = {}
    try:
        deadline = time.monotonic() + 120
        while len(reports) < 4:
            report = results.get(timeout=max(1.0, deadline - time.monotonic()))
            reports[report["rank"]] = report
        for p in procs:
            p.join(timeout=30)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0], "every rank must exit cleanly"
    except queue.Empty:
        raise AssertionError(f"ranks {sorted(set(range(4)) - set(reports))} did not report within 120 s") from None
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    for rank, report in reports.items():
        assert "error" not in report, f"rank {rank}: {report['error']}"
    return reports


@pytest.mark.slow
def test_broadcast_to_two_worker_groups_is_bit_identical_and_versioned():
    reports = run_job("healthy")
    assert reports[0]["made"] == ["sync-0", "sync-1", "sync-2"]
    assert [reports[r]["made"] for r in (1, 2, 3)] == [["sync-0"], ["sync-1"], ["sync-2"]]
    assert reports[0]["status"] == {"sync-a": (2, False, None), "sync-b": (2, False, None)}
    for rank in (1, 2, 3):
        assert reports[rank]["received"] == [(1, 1, True), (2, 2, True)]


@pytest.mark.slow
def test_group_that_never_joins_times_out_naming_group_and_version_while_the_other_receives():
    reports = run_job("dead_group")
    status = reports[0]["status"]
    assert status["sync-a"] == (2, False, None)
    sent, dead, error = status["sync-b"]
    assert (sent, dead) == (None, True)
    assert "group 'sync-b' (ranks [0, 2, 3]) for version 1" in error and "did not join within 2.0 s" in error
    assert 2.0 <= reports[0]["first_done_s"] < 15
    assert reports[1]["received"] == [(1, 1, True), (2, 2, True)]
    assert "group 'sync-a'" in reports[1]["receiver_timeout"] and "version 3" in reports[1]["receiver_timeout"]


def run_reuse_rank(rank: int, port: int, results: multiprocessing.Queue) -> None:
    """2 ranks: the learner publishes while the worker is late, then in step; each reports what it saw."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    report: dict = {"rank": rank}
    try:
        group = dist.new_group([0, 1], backend="gloo", timeout=timedelta(seconds=30))
        changed = {**model_weights(6), "tail.bias": torch.arange(3.0)}  # a layout change at version 6
        if rank == 0:
            packed_at: dict[int, int] = {}  # version -> address of its first bucket
            real_pack = weights_module.pack_weights_into

            def spy(named, reuse, bucket_bytes, device):
                packed = real_pack(named, reuse, bucket_bytes, device)
                packed_at[len(packed_at) + 1] = packed.buckets[0].data.data_ptr()
                return packed

            weights_module.pack_weights_into = spy
            publisher = WeightPublisher({"sync-0": group}, bucket_mb=BUCKET_MB, timeout_s=30)
            for version in (1, 2, 3):  # the worker joins late: 1 is in flight while 2 and then 3 are packed
                publisher.publish(version, one_pass(model_weights(version)))
            store.set("three_published", "1")  # only now may the worker join (no timing assumption)
            assert publisher.wait_idle(timeout=30)
            for version in (4, 5):
                publisher.publish(version, one_pass(model_weights(version)))
                assert publisher.wait_idle(timeout=30)
            publisher.publish(6, one_pass(changed))
            assert publisher.wait_idle(timeout=30)
            report["packed_at"] = packed_at
            report["status"] = publisher.status()["sync-0"].sent_version
            publisher.close()
        else:
            receiver = WeightReceiver(group, src_rank=0, timeout_s=30, name="sync-0")
            store.wait(["three_published"], timedelta(seconds=60))
            received, addresses = [], []
            # Which of 1-3 arrive depends on when the sender thread picked 1 up (a slow group skips to
            # the newest version); 4, 5 and 6 are published one at a time and always arrive.
            while not received or received[-1][0] < 6:
                version, weights = receiver.receive()
                expected = changed if version == 6 else model_weights(version)
                received.append((version, sorted(weights) == sorted(expected)  # names arrive in bucket order
                                 and all(bit_equal(weights[k], expected[k]) for k in expected)))
                addresses.append(weights["embed.weight"].data_ptr())
            report["received"], report["addresses"] = received, addresses
        dist.barrier()
    except BaseException as err:  # reported, so the parent shows the real failure
        report["error"] = repr(err)
    results.put(report)
    dist.destroy_process_group()


@pytest.mark.slow
def test_snapshot_buffers_are_reused_but_never_overwritten_while_in_flight():
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=run_reuse_rank, args=(r, port, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        reports = {}
        while len(reports) < 2:
            report = results.get(timeout=90)
            reports[report["rank"]] = report
        for p in procs:
            p.join(timeout=30)
    except queue.Empty:
        raise AssertionError("a rank did not report within 90 s") from None
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    for rank, report in reports.items():
        assert "error" not in report, f"rank {rank}: {report['error']} (all reports: {reports})"
    # Versions arrive in order, each bit-exact, never one overwritten while queued or in flight; 3 always
    # arrives (it replaced 2, and 1 if the sender had not started it), then 4, 5 and 6.
    versions = [v for v, _ in reports[1]["received"]]
    assert versions == sorted(set(versions)) and versions[-4:] == [3, 4, 5, 6]
    assert all(exact for _, exact in reports[1]["received"])
    at = reports[0]["packed_at"]
    # 2 and 3 were packed while 1 was queued or in flight: never into the buffers 1 still held.
    assert at[2] != at[1]
    # 4 and 5 are published one at a time into the same spare set: buffers are reused, not reallocated.
    assert at[4] == at[5]
    assert reports[0]["status"] == 6
    # 2 never arrives: 3 replaced it before the late worker joined.
    assert 2 not in versions
    # Same layout: the worker received into the same buffers each time until the layout changed (at 6).
    addresses = reports[1]["addresses"][:-1]
    assert len(addresses) >= 3 and len(set(addresses)) == 1
