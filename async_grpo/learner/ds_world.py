"""DeepSpeed's world is the learner group, not the whole job.

In the full job the torch.distributed world also holds the rollout worker ranks, which never call
into DeepSpeed. DeepSpeed 0.19.8 takes its data-parallel group from an `mpu` object
(`deepspeed.initialize(..., mpu=...)`): gradients are reduced and ZeRO partitions are cut over
`mpu.get_data_parallel_group()`. But it also calls collectives on the *default* group where it means
"all DeepSpeed ranks": world barriers when ZeRO-3 builds its partitions and around
`save_checkpoint`, a world all_reduce validating checkpoint tags, a world-sized clone group when no
mpu is given. Each of those would wait forever for the worker ranks.

So the learner gives DeepSpeed both:
- `LearnerParallelism`, the mpu: data parallel = the learner group, model parallel = this rank alone
  (a singleton group created locally, so the worker ranks need not take part);
- `scope_deepspeed_to_group`, which wraps DeepSpeed's communication backend so that a collective
  addressed to the default group goes to the learner group (and get_rank/get_world_size answer for
  it). Explicit groups pass through untouched. Learner ranks are [0, L) of the world, so global rank
  and learner rank coincide.
When the learner group is the whole world (one-role tests, single process) neither is needed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch.distributed as dist


class LearnerParallelism:
    """The `mpu` DeepSpeed reads: data parallel over the learner group, no model parallelism."""

    def __init__(self, group: dist.ProcessGroup):
        self._group = group
        self._ranks = dist.get_process_group_ranks(group)
        me = dist.get_rank()
        if me not in self._ranks:
            raise ValueError(f"rank {me} is not in the learner group {self._ranks}; only learner ranks build a Learner")
        # Only this rank belongs, so only this rank needs to create it.
        self._self_group = dist.new_group(ranks=[me], use_local_synchronization=True)

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._group

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._group)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self._group)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._ranks)

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._self_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_src_rank(self) -> int:
        return dist.get_rank()


# DeepSpeed's backend methods that take a process group, and where deepspeed.comm passes it
# positionally (every other call site passes `group=` by keyword). Their signatures cannot be
# inspected: DeepSpeed wraps them in decorators that hide the parameters. Point-to-point calls and
# destroy_process_group are left alone: they involve no absent ranks.
_POSITIONAL_GROUP = {"all_reduce": 2, "inference_all_reduce": 2, "all_reduce_coalesced": 2, "get_world_size": 0,
                     "get_rank": 0}
_KEYWORD_GROUP = frozenset({
    "broadcast", "broadcast_object_list", "all_gather", "all_gather_object", "reduce_scatter_tensor",
    "all_gather_into_tensor", "all_to_all_single", "all_to_all", "gather", "scatter", "barrier",
    "monitored_barrier", "reduce", "reduce_scatter", "all_gather_coalesced",
})


def _is_default_group(group: Any) -> bool:
    return group is None or group is dist.GroupMember.WORLD


class _GroupScopedBackend:
    """DeepSpeed's TorchBackend with the default group replaced by one process group."""

    def __init__(self, inner: Any, group: dist.ProcessGroup):
        self._inner = inner
        self._group = group

    def get_world_group(self) -> dist.ProcessGroup:
        return self._group

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name in _POSITIONAL_GROUP or name in _KEYWORD_GROUP:
            return self._scoped(attr, _POSITIONAL_GROUP.get(name))
        return attr

    def _scoped(self, method: Callable[..., Any], position: int | None) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            if position is not None and len(args) > position:
                if _is_default_group(args[position]):
                    args = args[:position] + (self._group,) + args[position + 1 :]
            elif _is_default_group(kwargs.get("group")):
                kwargs["group"] = self._group
            return method(*args, **kwargs)

        return call


def scope_deepspeed_to_group(group: dist.ProcessGroup) -> None:
    """Route DeepSpeed's default-group collectives of this process to `group` (idempotent)."""
    import deepspeed.comm.comm as ds_comm

    if ds_comm.cdb is None or not ds_comm.cdb.is_initialized():
        raise RuntimeError("DeepSpeed's communication backend is not initialised; call deepspeed.init_distributed first")
    if isinstance(ds_comm.cdb, _GroupScopedBackend):
        if ds_comm.cdb._group is not group:
            raise RuntimeError("DeepSpeed is already scoped to a different process group in this process")
        return
    ds_comm.cdb = _GroupScopedBackend(ds_comm.cdb, group)


def group_is_world(group: dist.ProcessGroup | None) -> bool:
    """True when `group` spans every rank of the job (or torch.distributed is a one-process world)."""
    if group is None or group is dist.GroupMember.WORLD:
        return True
    return dist.get_world_size(group) == dist.get_world_size()
