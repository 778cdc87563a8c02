"""The frozen reference policy for the KL term: a copy of the initial policy, never trained.

`reference_device` = "same": on the learner's device; under ZeRO-3 it is sharded like the policy (a
DeepSpeed engine with ZeRO-3 and no optimiser, so every learner rank holds 1/L of it and gathers
layer by layer in forward, in step with its peers). "cpu": a full fp32 copy on the host (frees
accelerator memory at the cost of a slow forward). Built only when `loss.kl_beta > 0`.

Given the completion mask, an unsharded reference scores only the masked rows through the fused
lm_head + logprob path (model/fused_logprobs.py) instead of making full [B, S, V] logits. With
`learner.compile` an unsharded CUDA reference has its layers compiled too (`speed_up`), since its
forward is a third of the FLOPs of a step with a KL term.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from async_grpo.model.fused_logprobs import EAGER, ChunkKernels, masked_token_logprobs
from async_grpo.model.logprobs import token_logprobs


class ReferencePolicy:
    """Log-probabilities of the targets under the frozen initial policy."""

    def __init__(self, policy: nn.Module, placement: str, device: torch.device, zero_stage: int,
                 mpu: Any | None, temperature: float, chunk_rows: int | None = None):
        if placement not in ("same", "cpu"):
            raise ValueError(f"loss.reference_device = {placement!r}: expected 'same' or 'cpu'")
        frozen = copy.deepcopy(policy).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        self.temperature = temperature
        self.device = torch.device("cpu") if placement == "cpu" else device
        self.sharded = placement == "same" and zero_stage == 3
        if self.sharded:
            import deepspeed

            config = {
                "train_micro_batch_size_per_gpu": 1,
                "bf16": {"enabled": device.type == "cuda"},
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                      "stage3_prefetch_bucket_size": 0},
                "steps_per_print": 10**9,
            }
            self.module, *_ = deepspeed.initialize(model=frozen, config=config, mpu=mpu, dist_init_required=False)
        else:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self.module = frozen.to(device=self.device, dtype=dtype)
        self.kernels: ChunkKernels = EAGER
        self.chunk_rows = chunk_rows  # rows per fused lm_head chunk; None: the module's default

    def speed_up(self, compile_layers: Callable[[nn.Module], None] | None, kernels: ChunkKernels) -> None:
        """Run like the policy (an unsharded CUDA copy only): `compile_layers(module)` if given, and the
        policy's logprob chunk kernels."""
        if self.sharded or self.device.type != "cuda":
            return
        if compile_layers is not None:
            compile_layers(self.module)
        self.kernels = kernels

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, targets [B, S] -> fp32 [B, S] on the caller's device (0 off `mask` when one is given)."""
        caller = input_ids.device
        input_ids, targets = input_ids.to(self.device), targets.to(self.device)
        if mask is not None and not self.sharded and hasattr(self.module, "lm_head"):
            hidden = self.module(input_ids, hidden_only=True)  # [B, S, H]
            logprobs, _ = masked_token_logprobs(hidden, self.module.lm_head.weight, targets, mask.to(self.device),
                                                self.temperature, chunk_rows=self.chunk_rows, kernels=self.kernels)
            return logprobs.to(caller)
        logits = self.module(input_ids)  # [B, S, V]
        return token_logprobs(logits, targets, self.temperature).to(caller)
