"""The learner loop: consume trajectories, step, publish weights, log, checkpoint, export.

Learner rank 0 owns the network side: the trajectory receiver (ZeroMQ PULL), the weights announcer
(PUB), the weight senders (one per sync group) and the run log. Every learner rank runs the same
step: rank 0 gathers `samples_per_step` fresh trajectories (dropping, and counting, those older than
`max_staleness` versions), shares them with the other learner ranks over the learner group (codec
frames in one byte tensor: the same validated format as the wire, never pickled), and all ranks take
their part of the DeepSpeed step. Every `sync_every` steps all learner ranks gather the full weights
together (ZeRO-3 needs every rank in the gather) and rank 0 hands them to the senders, which
broadcast from a copy while training goes on.

The store (torchrun's TCPStore) carries the rendezvous between roles: the endpoints, the prompt
positions a resumed run starts from, and the stop signal.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from async_grpo.config import RunConfig, dump_config
from async_grpo.learner.engine import Learner
from async_grpo.learner.run_log import RunLog
from async_grpo.transport import store_keys
from async_grpo.transport.codec import decode, encode
from async_grpo.transport.trajectory import Trajectory
from async_grpo.transport.trajectory_batch import TrajectoryView

log = logging.getLogger(__name__)



class NoTrajectories(RuntimeError):
    """No fresh trajectory arrived for longer than the collective timeout: the workers are gone."""


class WorkersLost(NoTrajectories):
    """Every worker group's weight sync failed: no fresh trajectory can come any more."""


def check_sync_groups(publisher) -> None:
    """Raise WorkersLost, naming each group and its error, once every sync group is marked dead."""
    status = publisher.status()
    if status and all(st.dead for st in status.values()):
        detail = "; ".join(f"group '{name}' (ranks {st.ranks}): {st.error}" for name, st in sorted(status.items()))
        raise WorkersLost(f"every weight-sync group is dead, no worker can receive new weights: {detail}")


@dataclass
class StepIntake:
    """What rank 0 collected for one step, and what it threw away doing so."""

    trajectories: list[TrajectoryView]  # lazy views of the received messages' columns
    dropped_stale: int = 0
    staleness: list[int] = field(default_factory=list)
    wait_s: float = 0.0


class TakenCounts:
    """How many trajectories the learner has taken from each worker group, mirrored into the store.

    Workers compare it with what they generated to bound what they have in flight (rollout_loop.py),
    so it is published as soon as trajectories leave the queue, not once per step.
    """

    def __init__(self, store: dist.Store | None):
        self.store = store
        self.counts: dict[int, int] = {}

    def add(self, trajs: list[Trajectory]) -> None:
        self.add_worker_ids(np.array([t.worker_id for t in trajs], dtype=np.int64))

    def add_worker_ids(self, worker_ids: np.ndarray) -> None:
        """Count one taken trajectory per entry (a message's worker_id column) and publish the changed totals."""
        groups, counts = np.unique(worker_ids, return_counts=True)
        for g, c in zip(groups.tolist(), counts.tolist()):
            self.counts[g] = self.counts.get(g, 0) + c
            if self.store is not None:
                self.store.set(store_keys.taken_key(g), str(self.counts[g]))


def collect_step(receiver, n: int, version: int, max_staleness: int, timeout_s: float,
                 taken: TakenCounts | None = None, check_workers: Callable[[], None] | None = None) -> StepIntake:
    """Take `n` trajectories whose policy is at most `max_staleness` versions behind `version`.

    Fails after `timeout_s` without a fresh trajectory (stale ones do not count: a worker group cut off
    from new weights keeps sending old-policy work that can never be used), or as soon as
    `check_workers` raises while the queue is empty. Staleness is judged a message at a time on its
    policy_version column; only the kept rows become per-trajectory views.
    """
    intake = StepIntake(trajectories=[])
    started = time.monotonic()
    last_arrival = started
    while len(intake.trajectories) < n:
        got = receiver.take_batches(n - len(intake.trajectories), timeout=1.0)
        now = time.monotonic()
        if not got:
            if check_workers is not None:
                check_workers()
            if now - last_arrival > timeout_s:
                raise NoTrajectories(
                    f"no trajectory reached the learner for {timeout_s:.0f} s (transport.collective_timeout_s) "
                    f"at policy version {version}: every worker group has stopped or lost its connection"
                )
            continue
        if taken is not None:  # one store update per worker group for the whole take
            taken.add_worker_ids(np.concatenate([batch.worker_id for batch in got]))
        for batch in got:
            lag = version - batch.policy_version  # [k] int64
            keep = (lag >= 0) & (lag <= max_staleness)  # [k] bool
            kept = int(keep.sum())
            intake.dropped_stale += len(batch) - kept
            if not kept:
                continue
            last_arrival = now
            fresh = batch if kept == len(batch) else batch.select(keep)
            intake.trajectories.extend(fresh.views())
            intake.staleness.extend(lag[keep].tolist())
    intake.wait_s = time.monotonic() - started
    return intake


def share_trajectories(trajs: list, group: dist.ProcessGroup | None, max_message_mb: float) -> list:
    """Learner rank 0's list on every learner rank: codec frames packed into one uint8 tensor."""
    if group is None or dist.get_world_size(group) == 1:
        return trajs
    src = dist.get_global_rank(group, 0)
    if dist.get_rank(group) == 0:
        frames = [memoryview(f).cast("B") for f in encode(trajs)]
        sizes = torch.tensor([len(frames)] + [f.nbytes for f in frames], dtype=torch.int64)  # [1 + F]
        payload = torch.frombuffer(bytearray(b"".join(frames)), dtype=torch.uint8)  # [sum of frame bytes]
        count = torch.tensor([sizes.numel(), payload.numel()], dtype=torch.int64)  # [2]
    else:
        count = torch.zeros(2, dtype=torch.int64)
    dist.broadcast(count, src=src, group=group)
    if dist.get_rank(group) != 0:
        sizes = torch.zeros(int(count[0]), dtype=torch.int64)
        payload = torch.zeros(int(count[1]), dtype=torch.uint8)
    dist.broadcast(sizes, src=src, group=group)
    dist.broadcast(payload, src=src, group=group)
    if dist.get_rank(group) == 0:
        return trajs
    bounds = sizes[1:].cumsum(0).tolist()
    data = payload.numpy().tobytes()
    frames, start = [], 0
    for end in bounds:
        frames.append(data[start:end])
        start = end
    return decode(frames, int(max_message_mb * 2**20 * max(1, len(trajs)))).views()


def reward_failures(trajs: list[Trajectory], seen: dict[str, dict[int, float]]) -> dict[str, float]:
    """Reward failures and timeouts so far, all worker groups together (workers send cumulative counts)."""
    for t in trajs:
        for key in ("reward_failures", "reward_timeouts"):
            per_worker = seen.setdefault(key, {})
            per_worker[t.worker_id] = max(per_worker.get(t.worker_id, 0.0), t.extra.get(key, 0.0))
    return {key: sum(per_worker.values()) for key, per_worker in seen.items()}


def worker_positions(trajs: list[Trajectory], positions: dict[str, int]) -> dict[str, int]:
    """Per worker group, the prompt position after the newest prompt consumed so far."""
    out = dict(positions)
    for t in trajs:
        key = str(t.worker_id)
        out[key] = max(out.get(key, 0), t.group_id + 1)
    return out


def run_learner(cfg: RunConfig, groups, store: dist.Store, resume: bool) -> int:
    """The loop of one learner rank."""
    from async_grpo.learner.checkpoint import latest_complete
    from async_grpo.learner.weight_export import iter_full_params, export_hf
    from async_grpo.model.build import build_model

    out_dir = Path(cfg.out_dir)
    is_rank0 = groups.rank == 0
    model = build_model(cfg.model, device="cpu")
    learner = Learner(cfg, model, groups.learner_group)
    data_position: dict[str, Any] = {}
    if resume:
        ckpt = latest_complete(out_dir)
        if ckpt is not None:
            data_position = learner.load_checkpoint(str(ckpt))
            log.info("resumed from %s at step %d (policy version %d)", ckpt, learner.step_count, learner.policy_version)
        elif is_rank0:
            log.info("--resume: no complete checkpoint under %s, starting fresh", out_dir)
    positions: dict[str, int] = dict(data_position.get("worker_positions", {}))
    start_step = learner.step_count

    receiver = announcer = publisher = run_log = taken = None
    if is_rank0:
        from async_grpo.transport.endpoints import open_learner_sockets
        from async_grpo.transport.weights import WeightPublisher

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(dump_config(cfg) + "\n")
        # Positions first: a worker reads them right after it finds the endpoints.
        store.set(store_keys.RESUME_POSITIONS, json.dumps(positions))
        sockets = open_learner_sockets(cfg.transport, store, out_dir)
        receiver, announcer = sockets.receiver, sockets.announcer
        publisher = WeightPublisher(groups.sync_groups, bucket_mb=cfg.transport.bucket_mb,
                                    timeout_s=cfg.transport.sync_timeout_s, announcer=announcer)
        run_log = RunLog(out_dir, resume_step=start_step)
        taken = TakenCounts(store)
        failure_counts: dict[str, dict[int, float]] = {}

    def publish_weights() -> float:
        started = time.monotonic()
        # Every learner rank iterates: under ZeRO-3 the ranks gather each bucket together.
        named = iter_full_params(learner.engine, int(cfg.transport.bucket_mb * 2**20), learner.group,
                                 device=learner.device)
        if is_rank0:
            publisher.publish(learner.policy_version, named)
        else:
            for _ in named:
                pass
        return time.monotonic() - started

    status = 0
    try:
        publish_weights()  # version 0 (or the resumed one): workers start from the learner's weights
        run_started = time.monotonic()
        for step in range(start_step + 1, cfg.trainer.max_steps + 1):
            step_started = time.monotonic()
            intake = None
            if is_rank0:
                intake = collect_step(receiver, cfg.learner.samples_per_step, learner.policy_version,
                                      cfg.max_staleness, cfg.transport.collective_timeout_s, taken,
                                      check_workers=lambda: check_sync_groups(publisher))
                trajs = intake.trajectories
            else:
                trajs = []
            trajs = share_trajectories(trajs, groups.learner_group, cfg.transport.max_message_mb)
            train_started = time.monotonic()
            metrics = learner.step_on_whole_batch(trajs)
            train_s = time.monotonic() - train_started
            sync_s = 0.0
            if learner.policy_version % cfg.transport.sync_every == 0 and step < cfg.trainer.max_steps:
                sync_s = publish_weights()
            positions = worker_positions(trajs, positions)
            if is_rank0:
                elapsed = time.monotonic() - step_started
                counters = receiver.counters()
                sync_status = publisher.status()
                tokens = sum(int(t.completion_ids.numel()) for t in trajs)
                row = {
                    "step": step,
                    "policy_version": learner.policy_version,
                    "reward_mean": sum(t.reward for t in trajs) / max(1, len(trajs)),
                    "staleness_max": max(intake.staleness, default=0),
                    "staleness_mean": sum(intake.staleness) / max(1, len(intake.staleness)),
                    "dropped_stale": intake.dropped_stale,
                    "rejected_messages": counters.rejected,
                    "queue_depth": receiver.depth,
                    "samples_per_s": len(trajs) / max(elapsed, 1e-9),
                    "tokens_per_s": tokens / max(elapsed, 1e-9),
                    "completion_len_mean": tokens / max(1, len(trajs)),
                    "wait_s": intake.wait_s,
                    "train_s": train_s,
                    "sync_s": sync_s,
                    "elapsed_s": time.monotonic() - run_started,
                    "sync_groups_dead": sum(st.dead for st in sync_status.values()),
                    **reward_failures(trajs, failure_counts),
                    # The newest version each worker group has fully received (-1: none yet).
                    **{f"synced_version/{name}": (-1 if st.sent_version is None else st.sent_version)
                       for name, st in sync_status.items()},
                    **{k: v for k, v in metrics.items() if k != "step"},
                }
                run_log.write(row)
                if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps:
                    print(RunLog.console_line(row, cfg.trainer.max_steps), flush=True)
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0 and step != cfg.trainer.max_steps:
                learner.save_checkpoint(str(out_dir), {"worker_positions": positions})
        # The end: a final checkpoint (so --resume of a finished run does nothing) and the HF export.
        if learner.step_count > start_step:
            learner.save_checkpoint(str(out_dir), {"worker_positions": positions})
        export_hf(learner.engine, model.args, out_dir / "final", group=learner.group)
    except BaseException:
        status = 1
        raise
    finally:
        if is_rank0:
            # Let broadcasts in flight finish while the workers still serve them, then stop everyone.
            publisher.wait_idle(cfg.transport.sync_timeout_s if status == 0 else 0)
            store.set(store_keys.STOP, "1" if status == 0 else "error")
            publisher.close()
            announcer.close()
            receiver.close()
            run_log.close()
    return status
