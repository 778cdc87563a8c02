"""The rollout worker loop: prompts -> G completions each -> rewards -> advantages -> trajectories.

One worker group is `workers.tp_size` ranks that generate together (tensor-parallel engine); its first
rank scores, computes group advantages and pushes the trajectories to the learner. Between batches and
at every decode step (through the engine's DecodeControl) the group checks for new weights and for the
learner's stop signal; all of its ranks agree on both by a MAX all_reduce on the tp_group, so they
receive a weight broadcast, and leave, on the same step.

Prompts are sharded by worker group (`Task.prompts(seed, group, num_groups)`): no two groups take the
same prompt in an epoch. Each trajectory's `group_id` is the prompt's position in its group's stream,
so the learner can checkpoint how far every stream was consumed and a resumed run starts there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from async_grpo.advantages import compute_advantages
from async_grpo.config import RunConfig
from async_grpo.transport import store_keys
from async_grpo.transport.control import WeightsListener
from async_grpo.transport.stream import PushTimeout, TrajectoryStream
from async_grpo.transport.trajectory_batch import TrajectoryBatch
from async_grpo.transport.weights import WeightReceiver
from async_grpo.workers.engine import GenerationEngine

log = logging.getLogger(__name__)


class RolloutStopped(Exception):
    """The learner asked the workers to stop."""


class LearnerSilent(RuntimeError):
    """The learner sent no weights, no stop signal and took nothing for longer than the collective timeout."""


@dataclass
class WorkerContext:
    """What one rank of a worker group holds, built by job.py."""

    cfg: RunConfig
    worker_group: int
    num_worker_groups: int
    tp_rank: int
    tp_group: dist.ProcessGroup | None
    store: dist.Store
    model: torch.nn.Module
    engine: GenerationEngine
    receiver: WeightReceiver
    listener: WeightsListener
    stream: TrajectoryStream | None  # only the group's first rank pushes
    task: object  # tasks.base.Task


class WeightSync:
    """The engine's DecodeControl: hears of new versions without blocking, receives them on demand."""

    def __init__(self, ctx: WorkerContext, stop_poll_s: float = 0.5):
        self.ctx = ctx
        self.version = -1
        self._announced: int | None = None
        self._stop_seen = False
        self._stop_poll_s = stop_poll_s
        self._last_stop_poll = 0.0

    def poll_new_weights(self) -> bool:
        announced = self.ctx.listener.poll(newer_than=self.version)
        if announced is not None:
            self._announced = announced
        return self._announced is not None and self._announced > self.version

    def poll_stop(self) -> bool:
        """Cheap enough for every decode step: asks the store at most every `stop_poll_s` seconds."""
        now = time.monotonic()
        if not self._stop_seen and now - self._last_stop_poll >= self._stop_poll_s:
            self._last_stop_poll = now
            self._stop_seen = self.ctx.store.check([store_keys.STOP])
        return self._stop_seen

    def on_new_weights(self) -> int:
        version, state = self.ctx.receiver.receive(timeout=self.ctx.cfg.transport.sync_timeout_s)
        self.ctx.model.load_full_state_dict(state)
        self.version = version
        self._announced = None
        return version


def serve_until(ctx: WorkerContext, sync: WeightSync, ready: Callable[[], bool], poll_s: float = 0.005) -> None:
    """Wait until `ready()` (asked on the group's first rank) while serving weight broadcasts and stop.

    Every rank of the group runs this same loop and all_reduces (MAX) the same four flags
    [not ready, new weights seen, stop seen, timed out] once per turn on the tp_group, so the ranks
    receive a broadcast, leave, go on or fail together; no rank ever waits in a collective its peers
    skip. Waiting longer than `transport.collective_timeout_s` without new weights means the learner
    is gone or stuck: LearnerSilent, naming the sync group, instead of waiting forever.
    """
    timeout_s = ctx.cfg.transport.collective_timeout_s
    last_progress = time.monotonic()
    while True:
        ok = ready() if ctx.tp_rank == 0 else True
        expired = time.monotonic() - last_progress > timeout_s
        flags = [not ok, sync.poll_new_weights(), sync.poll_stop(), expired]
        if ctx.tp_group is not None:
            t = torch.tensor([int(f) for f in flags], dtype=torch.int32)  # [4]
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.tp_group)
            flags = [bool(x) for x in t.tolist()]
        busy, new, stop, expired = flags
        if stop:
            raise RolloutStopped
        if new:
            sync.on_new_weights()
            last_progress = time.monotonic()
        if not busy:
            return
        if expired:
            raise LearnerSilent(
                f"worker group {ctx.worker_group}: waited {timeout_s:.0f} s (transport.collective_timeout_s) "
                f"with neither new weights on sync group '{ctx.receiver.name}' (holding version {sync.version}) "
                f"nor a stop signal, nor room to send: the learner is gone or stuck"
            )
        time.sleep(poll_s)


def build_trajectories(
    ctx: WorkerContext, items: list, completions: list, positions: list[int]
) -> list[TrajectoryBatch]:
    """Score every completion, compute group advantages, and build each prompt's trajectories.

    `group_id` is the prompt's position in this group's prompt stream (`positions[i]` for items[i]),
    which is what a resumed run needs to start after the prompts the learner consumed. Each prompt's
    kept samples become one columnar batch (one tensor conversion per field for the whole group),
    which the stream sends as one message without another copy.
    """
    flat_items, flat_ids, group_ids = [], [], []
    for g, (item, samples) in enumerate(zip(items, completions)):
        for sample in samples:
            flat_items.append(item)
            flat_ids.append(sample.token_ids)
            group_ids.append(positions[g])
    rewards = ctx.task.score_batch(flat_items, flat_ids)
    adv = compute_advantages(rewards, group_ids, ctx.cfg.learner.advantage)
    # The reward's cumulative failure counts ride along, so the learner's metrics show them per step.
    stats = ctx.task.reward_stats()
    extra = {f"reward_{k}": float(stats.get(k, 0)) for k in ("failures", "timeouts")}
    keep = adv.keep.tolist()
    advantages = adv.advantages.tolist()
    out: list[TrajectoryBatch] = []
    k = 0
    for g, (item, samples) in enumerate(zip(items, completions)):
        # Aborted samples (the run is stopping) and DAPO-filtered groups never leave the worker.
        kept = [s for s, sample in enumerate(samples) if keep[k + s] and sample.finish_reason != "abort"]
        chosen = [samples[s] for s in kept]
        out.append(TrajectoryBatch.from_group(
            item.prompt_ids, [c.token_ids for c in chosen], [c.logprobs for c in chosen],
            [rewards[k + s] for s in kept], [advantages[k + s] for s in kept], group_id=positions[g],
            sample_indices=kept, policy_versions=[c.policy_version for c in chosen],
            finish_reasons=[c.finish_reason for c in chosen], worker_id=ctx.worker_group, extra=extra,
        ))
        k += len(samples)
    return out


def push_groups(ctx: WorkerContext, sync: WeightSync, groups: list[TrajectoryBatch]) -> None:
    """Send the batch's trajectories as one message, with back-pressure, serving weights while blocked.

    All groups of a generation batch travel together (one copy to join them): the learner's per-message
    cost is paid once for B x G trajectories, not B times. A message is sent whole or not at all, so a
    retry after a full queue never sends a trajectory twice; only a batch over `max_message_mb` is split.
    """
    kept = [g for g in groups if g]
    pending = [TrajectoryBatch.concat(kept)] if kept and ctx.stream is not None else []
    if pending and not ctx.stream.fits_one_message(pending[0]):
        pending = kept  # one group per message: each is still sent whole or not at all

    def sent_all() -> bool:
        assert ctx.stream is not None
        while pending:
            try:
                ctx.stream.push(pending[0], timeout=0.2)
            except PushTimeout:
                return False
            pending.pop(0)
        return True

    serve_until(ctx, sync, sent_all if ctx.tp_rank == 0 else (lambda: True))


def in_flight_limit(cfg: RunConfig, num_worker_groups: int) -> int:
    """Most trajectories a worker group may have generated that the learner has not yet taken.

    The learner takes `samples_per_step` per version and drops what is more than `max_staleness`
    versions old, so a backlog beyond about max_staleness steps' worth would only be thrown away.
    The limit never falls below one step's share plus one batch: then the backlog of all groups
    together always covers a whole step, and the learner can never wait on workers that wait on it.
    """
    batch = cfg.workers.prompts_per_batch * cfg.workers.group_size
    share = -(-cfg.learner.samples_per_step // num_worker_groups)
    return max(share + batch - 1, max(1, cfg.max_staleness) * share)


def batches_per_version(cfg: RunConfig, num_worker_groups: int) -> int:
    """The sync baseline: batches each group generates with one version before it waits for the next."""
    per_batch = num_worker_groups * cfg.workers.prompts_per_batch * cfg.workers.group_size
    return max(1, -(-cfg.learner.samples_per_step // per_batch))


def _taken(ctx: WorkerContext) -> int:
    key = store_keys.taken_key(ctx.worker_group)
    return int(ctx.store.get(key)) if ctx.store.check([key]) else 0


def prompt_fits(ctx: WorkerContext, prompt_len: int, max_new_tokens: int) -> bool:
    """Whether a group of this prompt fits the model's positions and, at worst, the whole KV pool."""
    from async_grpo.preflight import blocks_for_one_group

    if prompt_len == 0 or prompt_len + max_new_tokens > ctx.model.args.max_position_embeddings:
        return False
    pool = ctx.engine.pool
    need = blocks_for_one_group(prompt_len, ctx.cfg.workers.group_size, max_new_tokens, pool.block_size)
    return need <= pool.num_blocks


def run_worker(ctx: WorkerContext, resume_position: int = 0) -> int:
    """The loop of one worker rank; returns when the learner says stop."""
    cfg = ctx.cfg
    batch = cfg.workers.prompts_per_batch * cfg.workers.group_size
    limit = in_flight_limit(cfg, ctx.num_worker_groups)
    budget = batches_per_version(cfg, ctx.num_worker_groups)
    sync = WeightSync(ctx)
    # A completion ends at the task tokenizer's stop ids (EOS, a chat end-of-turn) as well as the model's.
    stop_ids = sorted(set(cfg.sampling.stop_token_ids) | set(ctx.task.tokenizer.stop_ids))
    params = cfg.sampling.model_copy(update={"stop_token_ids": stop_ids})
    stream = ctx.task.prompts(cfg.seed, ctx.worker_group, ctx.num_worker_groups)
    stream.take(resume_position)  # a resumed run starts after what the learner already consumed
    position = resume_position
    batches = skipped = 0
    try:
        # The first weights come from the learner: a preset's init, a checkpoint, or a resumed policy.
        serve_until(ctx, sync, lambda: sync.version >= 0, poll_s=0.01)
        generated = 0  # trajectories this group has produced (what the learner's taken count compares to)
        while True:
            if cfg.mode == "sync":
                if batches and batches % budget == 0:
                    # The baseline: generate with version v, then wait until the learner has trained on it.
                    trained_on = sync.version
                    serve_until(ctx, sync, lambda: sync.version > trained_on, poll_s=0.01)
            else:
                # Hold the next batch while the learner has too much of this group's output untaken.
                serve_until(ctx, sync, lambda: generated - _taken(ctx) + batch <= limit)
            taken = stream.take(cfg.workers.prompts_per_batch)
            # Start-up checks sized the pool by the prompts they saw; a longer one later is skipped, not fatal.
            kept = [i for i, it in enumerate(taken) if prompt_fits(ctx, len(it.prompt_ids), params.max_new_tokens)]
            items = [taken[i] for i in kept]
            if len(items) < len(taken):
                skipped += len(taken) - len(items)
                log.warning("worker group %d: skipped %d prompts too long for the model or the KV pool (%d so far)",
                            ctx.worker_group, len(taken) - len(items), skipped)
            if not items:
                position += len(taken)
                continue
            seed = hash((cfg.seed, ctx.worker_group, position)) % (2**62)
            completions = ctx.engine.generate(
                [it.prompt_ids for it in items], cfg.workers.group_size, params, seed=seed, control=sync
            )
            if ctx.engine.stopped:
                raise RolloutStopped
            groups: list[TrajectoryBatch] = []
            if ctx.tp_rank == 0:
                groups = build_trajectories(ctx, items, completions, [position + i for i in kept])
                generated += sum(len(g) for g in groups)
            push_groups(ctx, sync, groups)
            position += len(taken)
            batches += 1
    except RolloutStopped:
        log.info("worker group %d rank %d: stop after %d batches", ctx.worker_group, ctx.tp_rank, batches)
        if ctx.store.get(store_keys.STOP) == b"error":
            log.error("worker group %d rank %d: the learner failed (see its error); exiting with status 1",
                      ctx.worker_group, ctx.tp_rank)
            return 1
    return 0
