"""Multi-tensor versions of the two per-gradient loops in DeepSpeed's ZeRO-1/2 optimiser step.

Before it updates anything, DeepSpeed's ZeRO-1/2 step (`DeepSpeedZeroOptimizer.step`) asks two
questions of this rank's gradients, one tensor at a time:

- overflow (bf16/fp16): does any gradient hold an inf or NaN? About eight small kernels per tensor
  (amax, amin, isfinite, logical ops, a running sum);
- the global L2 norm, for clipping: a cast and a `vector_norm` per tensor, then a sum, an all_reduce
  over the data-parallel group and a square root.

A 24-layer decoder has 290 gradient tensors, so that is some 3,000 kernel launches. On an H200 they
took 40-50 ms of host time in a 0.17 s step (16k tokens, 0.5B parameters), a third of the step, with
the GPU idle. `install_fused_grad_checks` answers both questions with one fp32 `torch._foreach_norm`
each: a tensor's norm is non-finite when one of its elements is, and the squared norms sum to the
global norm. Only the arithmetic changes: DeepSpeed still all_reduces the results over the ranks,
skips the step on overflow and clips by the norm, so a step's outcome is the same (the norm agrees to
fp32 rounding). The one different answer: a finite gradient whose norm exceeds ~1.8e19 reads as an
overflow here, where DeepSpeed's own norm is non-finite and it skips that step anyway.

The replacements are bound to one optimiser instance and replace instance attributes only. An
optimiser that is not DeepSpeed's ZeRO-1/2 class, offloads to the CPU, or lacks an attribute they use
(another DeepSpeed version) is left as it is.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

# What the replacements read from the optimiser; checked before anything is replaced.
_NEEDED = ("averaged_gradients", "bit16_groups", "dp_process_group", "model_parallel_rank", "cpu_offload",
           "has_overflow_partitioned_grads_serial", "get_grad_norm_direct", "_model_parallel_all_reduce", "device")


def install_fused_grad_checks(optimizer: Any) -> bool:
    """Replace `optimizer`'s per-tensor overflow check and gradient norm by multi-tensor ones.

    Returns whether they were installed (False: the optimiser keeps DeepSpeed's own loops).
    """
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return False
    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return False
    missing = [name for name in _NEEDED if not hasattr(optimizer, name)]
    if missing or optimizer.cpu_offload:
        if missing:
            log.warning("DeepSpeed's ZeRO optimiser lacks %s: keeping its per-tensor gradient checks", missing)
        return False
    optimizer.has_overflow_partitioned_grads_serial = _fused_overflow(optimizer)
    optimizer.get_grad_norm_direct = _fused_grad_norm(optimizer, optimizer.get_grad_norm_direct)
    return True


def gradient_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each tensor, fp32 [len(grads)], in one multi-tensor kernel per device and dtype."""
    return torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32))


def _fused_overflow(optimizer: Any) -> Callable[[], torch.Tensor]:
    def has_overflow_partitioned_grads_serial() -> torch.Tensor:
        """True ([1] bool on the device) when any of this rank's gradients holds an inf or NaN."""
        grads = [g for i in range(len(optimizer.bit16_groups)) for g in (optimizer.averaged_gradients[i] or ())
                 if g is not None and g.numel() > 0]
        if not grads:
            return torch.zeros(1, dtype=torch.bool, device=optimizer.device)
        # inf and NaN propagate through a norm. A finite tensor whose fp32 norm overflows (above ~1.8e19)
        # reads as one too; DeepSpeed's own norm is then non-finite, and it skips that step either way.
        return (~torch.isfinite(gradient_norms(grads))).any().reshape(1)

    return has_overflow_partitioned_grads_serial


def _fused_grad_norm(optimizer: Any, original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    from deepspeed import comm as ds_comm
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace

    def get_grad_norm_direct(gradients: list[torch.Tensor], params: list[torch.nn.Parameter],
                             norm_type: float = 2) -> torch.Tensor:
        """DeepSpeed's global L2 gradient norm (same filters, reduction and -1 for non-finite), fused."""
        if float(norm_type) != 2.0:
            return original(gradients, params, norm_type)
        picked = []
        unpadded = (g for g in gradients if not getattr(g, "_zero_padding", False))
        for grad, param in zip(unpadded, params):
            # The same parameters DeepSpeed counts: replicated pipeline copies once, model-parallel
            # replicas on model-parallel rank 0 only.
            if getattr(param, PIPE_REPLICATED, False):
                continue
            if is_model_parallel_parameter(param) or optimizer.model_parallel_rank == 0:
                if grad.is_sparse:
                    return original(gradients, params, norm_type)
                picked.append(grad.detach())
        if picked:
            # fp32 norms: the multi-tensor kernel's native accumulation (an fp64 one would copy every
            # gradient to fp64 first). DeepSpeed takes fp64 norms but casts their summed squares to fp32
            # before the root, so both read non-finite from the same size (~1.8e19) up.
            total = gradient_norms(picked).double().pow(2).sum().float()
        else:
            total = torch.zeros((), dtype=torch.float32, device=optimizer.device)
        ds_comm.all_reduce(total, op=ds_comm.ReduceOp.SUM, group=optimizer.dp_process_group)
        optimizer._model_parallel_all_reduce(tensor=total, op=ds_comm.ReduceOp.SUM)
        total = total.pow(0.5)
        mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)
        return total

    return get_grad_norm_direct
