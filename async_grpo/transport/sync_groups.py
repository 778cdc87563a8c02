"""The weight-sync process groups: learner rank 0 plus the ranks of one rollout worker group.

Ranks [0, L) are the learner; the remaining ranks form worker groups of `tp_size` consecutive ranks.
Group g's sync group is [0, L + g*tp_size, ..., L + (g+1)*tp_size - 1], named "sync-g". One group per
worker group means a slow or lost worker group stalls only its own broadcast. torch requires every
rank to call `new_group` for every group in the same order, members or not, so every rank of the job
calls `make_sync_groups` with the same arguments at the same point of start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch.distributed as dist

LEARNER_SRC_RANK = 0  # the learner rank that holds the full weights and sends them


@dataclass(frozen=True)
class SyncGroupSpec:
    """One sync group: its index (the worker group's), name and global ranks (sender first)."""

    index: int
    name: str
    ranks: tuple[int, ...]


def sync_group_layout(
    world_size: int, num_learner_ranks: int, tp_size: int | Sequence[int]
) -> list[SyncGroupSpec]:
    """Every sync group of the job, in creation order.

    `tp_size` is one size for every worker group, or each group's size in rank order (groups may
    differ, e.g. [1, 2]); the sizes must add up to the worker ranks.
    """
    num_worker_ranks = world_size - num_learner_ranks
    if isinstance(tp_size, int):
        if num_learner_ranks < 1 or tp_size < 1:
            raise ValueError(f"num_learner_ranks = {num_learner_ranks}, tp_size = {tp_size}: expected both >= 1")
        if num_worker_ranks < tp_size or num_worker_ranks % tp_size:
            raise ValueError(
                f"world_size = {world_size} with {num_learner_ranks} learner ranks leaves {num_worker_ranks} worker "
                f"ranks: expected a positive multiple of workers.tp_size = {tp_size}"
            )
        sizes = [tp_size] * (num_worker_ranks // tp_size)
    else:
        sizes = list(tp_size)
        if num_learner_ranks < 1 or not sizes or min(sizes) < 1 or sum(sizes) != num_worker_ranks:
            raise ValueError(
                f"worker group sizes {sizes} with {num_learner_ranks} learner ranks: expected positive sizes adding "
                f"up to the {num_worker_ranks} worker ranks of a world of {world_size}"
            )
    specs, start = [], num_learner_ranks
    for g, size in enumerate(sizes):
        specs.append(SyncGroupSpec(index=g, name=f"sync-{g}", ranks=(LEARNER_SRC_RANK, *range(start, start + size))))
        start += size
    return specs


def make_sync_groups(
    world_size: int, num_learner_ranks: int, tp_size: int | Sequence[int], backend: str, timeout: float | timedelta
) -> dict[str, dist.ProcessGroup]:
    """Create all sync groups (collective: every rank calls it); return the ones this rank belongs to.

    Learner rank 0 gets every group, a worker rank its own one, other learner ranks none. `timeout`
    (seconds) bounds every collective on these groups, so a peer that never joins fails the
    broadcast instead of hanging it.
    """
    if not dist.is_initialized():
        raise RuntimeError("make_sync_groups() needs torch.distributed to be initialised first")
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size = {world_size}: expected the job's world size {dist.get_world_size()}")
    span = timeout if isinstance(timeout, timedelta) else timedelta(seconds=timeout)
    rank = dist.get_rank()
    mine: dict[str, dist.ProcessGroup] = {}
    for spec in sync_group_layout(world_size, num_learner_ranks, tp_size):
        group = dist.new_group(list(spec.ranks), timeout=span, backend=backend)
        if rank in spec.ranks:
            mine[spec.name] = group
    return mine
