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

import torch
import torch.distributed as dist

from async_grpo.advantages import compute_advantages
from async_grpo.config import RunConfig
from async_grpo.transport import store_keys
from async_grpo.transport.control import WeightsListener
from async_grpo.transport.stream import PushTimeout, TrajectoryStream
from async_grpo.transport.trajectory import Trajectory
from async_grpo.transport.weights import WeightReceiver
from async_grpo.workers.engine import GenerationEngine

log = logging.getLogger(__name__)



class RolloutStopped(Exception):
    """The learner asked the workers to stop."""


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


def _agree(ctx: WorkerContext, *flags: bool) -> list[bool]:
    """MAX of each flag over the worker group: every rank acts on what any rank saw."""
    if ctx.tp_group is None:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32)  # [len(flags)]
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.tp_group)
    return [bool(x) for x in t.tolist()]


def _wait_for_weights(ctx: WorkerContext, sync: WeightSync, *, newer_than: int) -> None:
    """Block (polling) until a version newer than `newer_than` has been received, or stop is asked."""
    while True:
        new, stop = _agree(ctx, sync.poll_new_weights(), sync.poll_stop())
        if stop:
            raise RolloutStopped
        if new:
            sync.on_new_weights()
            if sync.version > newer_than:
                return
        time.sleep(0.01)


def build_trajectories(
    ctx: WorkerContext, items: list, completions: list, first_position: int
) -> tuple[list[Trajectory], dict[str, float]]:
    """Score every completion, compute group advantages, and build the trajectories to send."""
    cfg = ctx.cfg
    flat_items, flat_ids, group_ids = [], [], []
    for g, (item, samples) in enumerate(zip(items, completions)):
        for sample in samples:
            flat_items.append(item)
            flat_ids.append(sample.token_ids)
            group_ids.append(first_position + g)
    rewards = ctx.task.score_batch(flat_items, flat_ids)
    adv = compute_advantages(rewards, group_ids, cfg.learner.advantage)
    trajectories: list[Trajectory] = []
    k = 0
    for g, (item, samples) in enumerate(zip(items, completions)):
        prompt = torch.tensor(item.prompt_ids, dtype=torch.int32)  # [P], shared by the group's samples
        for s, sample in enumerate(samples):
            if bool(adv.keep[k]) and sample.finish_reason != "abort":
                trajectories.append(
                    Trajectory(
                        prompt_ids=prompt,
                        completion_ids=sample.token_ids,
                        behaviour_logprobs=sample.logprobs,
                        reward=rewards[k],
                        advantage=float(adv.advantages[k]),
                        group_id=first_position + g,
                        sample_index=s,
                        policy_version=sample.policy_version,
                        finish_reason=sample.finish_reason,
                        worker_id=ctx.worker_group,
                    )
                )
            k += 1
    stats = {"reward_mean": float(sum(rewards) / max(1, len(rewards))), "kept": float(len(trajectories))}
    return trajectories, stats


def _push(ctx: WorkerContext, sync: WeightSync, trajectories: list[Trajectory]) -> None:
    """Push with back-pressure, but keep hearing the stop signal while the learner's queue is full."""
    assert ctx.stream is not None
    while True:
        try:
            ctx.stream.push(trajectories, timeout=1.0)
            return
        except PushTimeout:
            if sync.poll_stop():
                raise RolloutStopped from None


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


def _wait_for_room(ctx: WorkerContext, sync: WeightSync, generated: int, limit: int, batch: int) -> None:
    """Async mode: hold the next batch while the learner has too much of this group's output untaken.

    Weight broadcasts and the stop signal are still served while waiting; all ranks of the group agree
    on every decision, so they wait, receive and leave together.
    """
    while True:
        room = ctx.tp_rank != 0 or generated - _taken(ctx) + batch <= limit
        room_all, new, stop = _agree(ctx, not room, sync.poll_new_weights(), sync.poll_stop())
        if stop:
            raise RolloutStopped
        if new:
            sync.on_new_weights()
        if not room_all:
            return
        time.sleep(0.005)


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
    batches = 0
    try:
        # The first weights come from the learner: a preset's init, a checkpoint, or a resumed policy.
        _wait_for_weights(ctx, sync, newer_than=-1)
        generated = 0  # trajectories this group has produced (what the learner's taken count compares to)
        while True:
            if cfg.mode == "sync":
                if batches and batches % budget == 0:
                    # The baseline: generate with version v, then wait until the learner has trained on it.
                    _wait_for_weights(ctx, sync, newer_than=sync.version)
            else:
                _wait_for_room(ctx, sync, generated, limit, batch)
            items = stream.take(cfg.workers.prompts_per_batch)
            seed = hash((cfg.seed, ctx.worker_group, position)) % (2**62)
            completions = ctx.engine.generate(
                [it.prompt_ids for it in items], cfg.workers.group_size, params, seed=seed, control=sync
            )
            if ctx.engine.stopped:
                raise RolloutStopped
            if ctx.tp_rank == 0:
                trajectories, _ = build_trajectories(ctx, items, completions, position)
                if trajectories:
                    _push(ctx, sync, trajectories)
                generated += len(trajectories)
            position += len(items)
            batches += 1
    except RolloutStopped:
        log.info("worker group %d rank %d: stop after %d batches", ctx.worker_group, ctx.tp_rank, batches)
    return 0
