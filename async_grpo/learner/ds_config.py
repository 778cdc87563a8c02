"""The DeepSpeed configuration and optimiser of the learner, from `cfg.learner`.

bf16 on GPU (DeepSpeed keeps fp32 master weights in the ZeRO optimiser), fp32 on CPU. Gradient
accumulation is driven by the engine: a step has as many micro-batches as the token budget makes,
so DeepSpeed's own `gradient_accumulation_steps` stays 1 and the learner marks the last micro-batch
as the accumulation boundary itself. The optimiser is torch's AdamW (any device) or DeepSpeed's
FusedAdam (GPU), built here and handed to `deepspeed.initialize`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from async_grpo.config import LearnerConfig


def deepspeed_config(cfg: LearnerConfig, device: torch.device, dp_world_size: int) -> dict[str, Any]:
    """The dict given to `deepspeed.initialize`."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if device.type != "cuda":
        if cfg.zero_stage == 3:
            # Small CPU models must still be partitioned and gathered (the defaults keep tensors under
            # 100k elements whole), so CPU runs exercise the collectives a big model runs on GPU.
            zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
        # Overlapping communication needs CUDA streams.
        zero["overlap_comm"] = False
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": dp_world_size,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": device.type == "cuda"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # Tags are validated with an all_reduce; every learner rank passes the same tag anyway.
        "checkpoint": {"tag_validation": "IGNORE"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: nn.Module, cfg: LearnerConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: FusedAdam on GPU when asked for (or `auto`), else torch's."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters (all requires_grad=False)")
    kind = cfg.optimizer
    if kind == "fused_adam" and device.type != "cuda":
        raise ValueError(f"learner.optimizer = 'fused_adam' needs a CUDA device, but the learner runs on {device}")
    if kind == "fused_adam" or (kind == "auto" and device.type == "cuda"):
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, adam_w_mode=True)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
