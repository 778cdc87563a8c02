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
from async_grpo.transport.weight_buckets import decode_header, encode_header, pack_weights, unpack_buckets
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
