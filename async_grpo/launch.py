"""Roles and process groups of one job, read from the torchrun environment.

Ranks [0, L) are the learner (DeepSpeed's data-parallel world); the remaining ranks form rollout worker
groups of `workers.tp_size` consecutive ranks. Every rank creates every group in the same order (torch
requires all ranks to take part in each `new_group` call), then keeps the ones it belongs to:

    learner_group   ranks [0, L)
    tp_group[g]     the ranks of worker group g
    sync-g          learner rank 0 + the ranks of worker group g (weight broadcasts; transport/sync_groups.py)

`plan_layout` checks the shape of the job against the config before any process group starts, so a bad
`learner.num_ranks` or `workers.tp_size` is a ConfigError (exit 2), not a hang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from async_grpo.config import ConfigError, RunConfig
from async_grpo.transport.sync_groups import make_sync_groups


@dataclass(frozen=True)
class Layout:
    """The shape of the job: which ranks do what. Pure data, computed identically on every rank."""

    world_size: int
    num_learner_ranks: int
    group_sizes: tuple[int, ...]  # ranks of each worker group, in rank order

    @property
    def num_worker_groups(self) -> int:
        return len(self.group_sizes)

    def worker_group_ranks(self, group: int) -> list[int]:
        start = self.num_learner_ranks + sum(self.group_sizes[:group])
        return list(range(start, start + self.group_sizes[group]))

    def worker_group_of(self, rank: int) -> int | None:
        for g in range(self.num_worker_groups):
            if rank in self.worker_group_ranks(g):
                return g
        return None


def plan_layout(cfg: RunConfig, world_size: int) -> Layout:
    """Check that `world_size` processes can hold the configured learner and worker groups."""
    learners, tp = cfg.learner.num_ranks, cfg.workers.tp_size
    if learners >= world_size:
        raise ConfigError(
            "learner.num_ranks", learners,
            f"fewer than the world size ({world_size} processes), so that at least one worker group remains",
        )
    workers = world_size - learners
    sizes = cfg.workers.group_tp_sizes
    if sizes is not None:
        if not sizes or min(sizes) < 1 or sum(sizes) != workers:
            raise ConfigError(
                "workers.group_tp_sizes", sizes,
                f"positive sizes adding up to the {workers} worker ranks (world {world_size} - {learners} learner ranks)",
            )
        return Layout(world_size, learners, tuple(sizes))
    if workers % tp != 0:
        raise ConfigError(
            "workers.tp_size", tp,
            f"a divisor of the {workers} worker ranks (world {world_size} - {learners} learner ranks)",
        )
    return Layout(world_size, learners, (tp,) * (workers // tp))


def local_world_size(cfg: RunConfig) -> int:
    """World size of a job launched without torchrun: learner ranks + the worker groups' ranks."""
    if cfg.workers.group_tp_sizes is not None:
        return cfg.learner.num_ranks + sum(cfg.workers.group_tp_sizes)
    return cfg.learner.num_ranks + cfg.num_workers * cfg.workers.tp_size


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def pick_device(requested: str, local_rank: int, share_gpu: bool) -> torch.device:
    """`auto` takes this node's GPU `local_rank` (or GPU 0 when all roles share one), else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device", requested, "a machine with a CUDA device (none is visible)")
    index = 0 if share_gpu else local_rank % torch.cuda.device_count()
    return torch.device("cuda", index)


@dataclass
class Groups:
    """This rank's view of the job's process groups."""

    rank: int
    layout: Layout
    learner_group: dist.ProcessGroup | None = None
    tp_group: dist.ProcessGroup | None = None
    worker_group: int | None = None
    # by name ("sync-g"): learner rank 0 holds every sync group, a worker rank its own one
    sync_groups: dict[str, dist.ProcessGroup] = field(default_factory=dict)

    @property
    def is_learner(self) -> bool:
        return self.rank < self.layout.num_learner_ranks

    @property
    def tp_rank(self) -> int:
        assert self.worker_group is not None
        return self.rank - self.layout.worker_group_ranks(self.worker_group)[0]


def attempt_store(timeout: datetime.timedelta) -> tuple[dist.Store, int, int]:
    """torchrun's store (env:// rendezvous) under a prefix of this restart attempt; also rank and world size.

    torchrun keeps one store for the whole job across restarts (`--max-restarts`): keys written by a
    failed attempt (gloo's rank addresses, the learner's endpoints, the stop signal) are still there when
    the job starts again, and a restarted rank would connect to processes that no longer exist. Every
    attempt (TORCHELASTIC_RESTART_COUNT) therefore reads and writes keys of its own.
    """
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    return dist.PrefixStore(f"async_grpo/attempt_{attempt}", store), rank, world_size


def init_groups(layout: Layout, *, use_cuda: bool, sync_backend: str, timeout_s: float,
                sync_timeout_s: float | None = None) -> Groups:
    """Initialise torch.distributed from the torchrun environment and create every group, in one order.

    On GPU the default backend is `cpu:gloo,cuda:nccl`, so CPU-side control tensors and CUDA payloads both
    work; `sync_backend` is "gloo" when the learner and a worker share one GPU (NCCL cannot hold two ranks
    on one device). Every collective inherits `timeout_s`: a peer that never joins fails, never hangs.
    The sync groups get `sync_timeout_s` (default `timeout_s`): a weight broadcast that times out is
    then aborted by the backend too, instead of staying pending (and blocking the process's exit)
    until the longer collective timeout.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        store, rank, world_size = attempt_store(timeout)
        dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=rank, world_size=world_size)
    rank = dist.get_rank()
    groups = Groups(rank=rank, layout=layout, worker_group=layout.worker_group_of(rank))

    learner_ranks = list(range(layout.num_learner_ranks))
    group = dist.new_group(learner_ranks, timeout=timeout, backend=backend)
    if rank in learner_ranks:
        groups.learner_group = group

    for g in range(layout.num_worker_groups):
        ranks = layout.worker_group_ranks(g)
        group = dist.new_group(ranks, timeout=timeout, backend=backend)
        if rank in ranks:
            groups.tp_group = group

    # Sync groups come last and with their own backend (gloo when learner and workers share a GPU).
    groups.sync_groups = make_sync_groups(layout.world_size, layout.num_learner_ranks, list(layout.group_sizes),
                                          sync_backend, datetime.timedelta(seconds=sync_timeout_s or timeout_s))
    return groups
