"""Full policy weights out of the learner: for the weight broadcast and for the final HF checkpoint.

Under ZeRO-3 each learner rank holds 1/L of every parameter; a full tensor exists only inside
`deepspeed.zero.GatheredParameters`, which is a collective. Gathering on rank 0 alone hangs until the
watchdog fires (reported against TRL and prime-rl), so ALL learner ranks walk the same parameter
sequence, bucket by bucket, and gather together; rank 0 yields the full tensors and the other ranks
yield nothing but take part. Callers on every rank must exhaust the iterator.
Under ZeRO-1/2 every rank holds the full parameters already and nothing is gathered.
Names are the model's own, which are Hugging Face names (a tied lm_head appears once, as the
embedding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_BUCKET_BYTES = 256 * 2**20


def _is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def _full_numel(param: torch.Tensor) -> int:
    return int(param.ds_numel) if _is_partitioned(param) else param.numel()


def _buckets(named: list[tuple[str, nn.Parameter]], bucket_bytes: int) -> Iterator[list[tuple[str, nn.Parameter]]]:
    bucket: list[tuple[str, nn.Parameter]] = []
    size = 0
    for name, param in named:
        nbytes = _full_numel(param) * param.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, param))
        size += nbytes
    if bucket:
        yield bucket


def iter_full_params(
    engine: Any,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor on `device`) on learner rank 0; nothing elsewhere. Collective under ZeRO-3.

    engine: a DeepSpeed engine (or a plain module); group: the learner group (None: the world).
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes = {bucket_bytes!r}: expected >= 1")
    module = engine.module if hasattr(engine, "module") else engine
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    named = list(module.named_parameters())
    if not any(_is_partitioned(p) for _, p in named):
        if rank == 0:
            for name, param in named:
                yield name, param.detach().to(device, copy=True)
        return
    import deepspeed

    for bucket in _buckets(named, bucket_bytes):
        params = [p for _, p in bucket]
        # Every rank enters the gather for every bucket; modifier_rank=None: read-only, no re-partition write.
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                full = [(name, p.detach().to(device, copy=True)) for name, p in bucket]
            else:
                full = []
        yield from full


def full_state_dict(engine: Any, group: dist.ProcessGroup | None = None,
                    bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> dict[str, torch.Tensor]:
    """All full parameters as a CPU state dict on rank 0 (empty elsewhere); collective under ZeRO-3."""
    return dict(iter_full_params(engine, bucket_bytes, group))


def export_hf(engine: Any, args: Any, path: str | Path, group: dist.ProcessGroup | None = None,
              dtype: torch.dtype | None = None) -> None:
    """Write a transformers-loadable checkpoint (config.json + model.safetensors) from rank 0.

    args: the policy's `ModelArgs`. Collective: every learner rank must call it.
    """
    from async_grpo.model.hf_io import save_pretrained

    state = full_state_dict(engine, group)
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    if rank == 0:
        save_pretrained(state, args, path, dtype=dtype)
    if dist.is_initialized():
        dist.barrier(group=group)
