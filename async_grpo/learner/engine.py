"""The learner: one DeepSpeed ZeRO engine per learner rank and the GRPO optimiser step.

`Learner(cfg, model, group)` wraps the policy in DeepSpeed (ZeRO stage 1/2/3 from `learner.zero_stage`,
bf16 on GPU, fp32 on CPU) whose data-parallel world is exactly `group`, the learner ranks (see
ds_world.py for why worker ranks in the same job do not hang it). A step:

  1. the step's trajectories become micro-batches (batching.py); every rank runs the same number;
  2. the loss normaliser is the GLOBAL token (or sequence) count of the step, so the gradient does
     not depend on how the step was packed or split over ranks (loss.py);
  3. each micro-batch: forward, token logprobs at the sampling temperature, optional reference
     logprobs, loss, backward; gradients accumulate until the last micro-batch, where DeepSpeed
     reduces them over the learner ranks. With `learner.fused_logprobs` (default under ZeRO-1/2) the
     forward stops at the final hidden states and model/fused_logprobs.py applies the lm_head to the
     completion rows only, chunk by chunk, so no [B, S, V] logits tensor is ever made;
  4. one optimiser step (with gradient clipping and the LR schedule), metrics reduced over ranks.
     Under ZeRO-1/2 DeepSpeed's per-gradient overflow check and norm run as multi-tensor kernels
     (zero_grad_checks.py, `learner.fused_grad_checks`).

`policy_version` counts optimiser steps since the initial weights; it travels with every weight
broadcast and every trajectory generated from it.

`learner.compile` compiles each decoder layer with torch.compile before DeepSpeed wraps the model
(`Module.compile` in place, so parameter names do not change), which fuses the layers' elementwise
work (RMSNorm, RoPE, SwiGLU, residuals, casts). AOTAutograd keeps every parameter's gradient
accumulation node, so ZeRO-1/2's gradient hooks fire as before.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from async_grpo.config import RunConfig
from async_grpo.learner.batching import RankPlan, TrajectoryFields, pack_micro_batches, pad_to_count, plan_step
from async_grpo.learner.ds_config import build_optimizer, deepspeed_config
from async_grpo.learner.ds_world import LearnerParallelism, group_is_world, scope_deepspeed_to_group
from async_grpo.learner.loss import grpo_loss, loss_normalizer
from async_grpo.learner.metrics import StepMetrics
from async_grpo.learner.reference import ReferencePolicy
from async_grpo.learner.schedule import make_lr_lambda
from async_grpo.learner.zero_grad_checks import install_fused_grad_checks
from async_grpo.model.fused_logprobs import ChunkKernels, chunk_rows_for, masked_token_logprobs
from async_grpo.model.logprobs import token_entropy, token_logprobs


def learner_device(device: str) -> torch.device:
    """`learner.device` resolved: auto is this rank's CUDA device when there is one, else the CPU."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("learner.device = 'cuda' but no CUDA device is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def fused_logprobs_enabled(setting: bool | str, zero_stage: int, model: nn.Module) -> bool:
    """`learner.fused_logprobs` resolved: auto is on under ZeRO-1/2 for a model with an lm_head."""
    tp_size = getattr(getattr(model, "tp", None), "size", 1)
    fits = zero_stage <= 2 and tp_size == 1 and hasattr(model, "lm_head")
    if setting == "auto":
        return fits
    if setting is True and not fits:
        raise ValueError(
            f"learner.fused_logprobs = true with learner.zero_stage = {zero_stage} and a tensor-parallel size of "
            f"{tp_size}: expected zero_stage <= 2 and one tensor-parallel rank (the fused path reads the whole "
            "lm_head weight outside the lm_head module, which ZeRO-3 keeps partitioned there)")
    return bool(setting)


def compile_enabled(setting: bool | str, device: torch.device, zero_stage: int) -> bool:
    """`learner.compile` resolved: auto is on for CUDA under ZeRO-1/2."""
    if setting == "auto":
        return device.type == "cuda" and zero_stage <= 2
    if setting is True and zero_stage == 3:
        raise ValueError("learner.compile = true with learner.zero_stage = 3: expected zero_stage <= 2 "
                         "(ZeRO-3 gathers parameters in hooks inside every layer call, which would break the graphs)")
    return bool(setting)


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile every decoder layer in place (parameter names and the module tree stay as they are)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"learner.compile needs a decoder with model.layers; got a {type(model).__name__}")
    # The layers share one graph (same code, parameters as inputs); micro-batches of new [B, S] turn it
    # dynamic after the first recompile instead of compiling one graph per shape. Each layer's integer
    # `layer_idx` would otherwise be a guard of its own: on an H200 the 9th layer hit dynamo's recompile
    # limit (8) and layers 9-24 silently ran eagerly. Made symbolic, it is one graph; the raised limit
    # keeps every layer compiled should a torch version specialise it anyway.
    import torch._dynamo

    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), len(layers) + 8))
    for layer in layers:
        layer.compile(backend=backend)
    final_norm = getattr(model.model, "norm", None)
    if final_norm is not None:
        final_norm.compile(backend=backend)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_distributed(device: torch.device, timeout_s: float = 600.0) -> None:
    """A one-process world when none exists (tools and single-process runs); a launched job has one."""
    if dist.is_initialized():
        return
    # DeepSpeed insists on LOCAL_RANK, which only launchers set.
    os.environ.setdefault("LOCAL_RANK", "0")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=timeout_s))


def _import_deepspeed(device: torch.device) -> Any:
    if device.type == "cpu":
        # Must be set before deepspeed is first imported, or it probes for (and fails on) CUDA.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


class Learner:
    """The policy under DeepSpeed ZeRO plus the GRPO step; one instance on every learner rank."""

    def __init__(self, cfg: RunConfig, model: nn.Module, group: dist.ProcessGroup | None = None):
        self.cfg = cfg
        lcfg = cfg.learner
        self.device = learner_device(lcfg.device)
        ensure_distributed(self.device, cfg.transport.collective_timeout_s)
        deepspeed = _import_deepspeed(self.device)
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        self.group = None if group_is_world(group) else group
        self.mpu = None
        if self.group is not None:
            self.mpu = LearnerParallelism(self.group)
            scope_deepspeed_to_group(self.group)
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if self.world_size != lcfg.num_ranks:
            raise ValueError(f"learner.num_ranks = {lcfg.num_ranks} but the learner group has {self.world_size} ranks")
        self.temperature = cfg.sampling.temperature if cfg.sampling.temperature > 0 else 1.0

        if lcfg.gradient_checkpointing:
            if not hasattr(model, "gradient_checkpointing"):
                raise ValueError("learner.gradient_checkpointing = true but the model has no gradient_checkpointing flag")
            model.gradient_checkpointing = True
        # Rows per fused lm_head chunk, for the policy and the reference alike (None: no lm_head to fuse).
        head = getattr(model, "lm_head", None)
        self.logprob_chunk_rows = (chunk_rows_for(head.weight.shape[0], lcfg.logprob_chunk_mb)
                                   if head is not None else None)
        # The reference is the policy's initial weights, copied before DeepSpeed partitions them.
        self.reference: ReferencePolicy | None = None
        if lcfg.loss.kl_beta > 0:
            self.reference = ReferencePolicy(model, lcfg.loss.reference_device, self.device, lcfg.zero_stage,
                                             self.mpu, self.temperature, chunk_rows=self.logprob_chunk_rows)
        self.fused_logprobs = fused_logprobs_enabled(lcfg.fused_logprobs, lcfg.zero_stage, model)
        self.compiled = compile_enabled(lcfg.compile, self.device, lcfg.zero_stage)
        if self.compiled:
            # After the reference copy (deep-copied eager) and before DeepSpeed holds the layers.
            compile_decoder_layers(model)
        self.chunk_kernels = ChunkKernels(compiled=self.compiled and self.device.type == "cuda")
        if self.reference is not None:
            self.reference.speed_up(compile_decoder_layers if self.compiled else None, self.chunk_kernels)
        model = model.to(self.device)
        optimizer = build_optimizer(model, lcfg, self.device)
        decay_steps = lcfg.decay_steps or cfg.trainer.max_steps
        lr_lambda = make_lr_lambda(lcfg.warmup_steps, decay_steps, lcfg.lr_schedule, lcfg.min_lr_ratio)
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
            config=deepspeed_config(lcfg, self.device, self.world_size),
            mpu=self.mpu,
            dist_init_required=False,
        )
        self.engine.train()
        self.fused_grad_checks = lcfg.fused_grad_checks and install_fused_grad_checks(self.optimizer)
        self.step_count = 0
        self.policy_version = 0

    @property
    def module(self) -> nn.Module:
        """The policy as DeepSpeed holds it (ZeRO-3: partitioned parameters)."""
        return self.engine.module

    def step(self, trajectories: Sequence[TrajectoryFields]) -> dict[str, float]:
        """One optimiser step from THIS rank's share of the step's trajectories (collective over the group).

        Token/sequence counts and the micro-batch count are agreed with one small all_reduce each.
        """
        lcfg = self.cfg.learner
        micro = pack_micro_batches(trajectories, lcfg.micro_batch_tokens, lcfg.pad_token_id)
        totals = torch.tensor([sum(len(t.completion_ids) for t in trajectories), len(trajectories)],
                              dtype=torch.int64, device=self.device)  # [2] tokens, sequences
        # On the learner's device: an NCCL group cannot reduce host tensors.
        count = torch.tensor([len(micro)], dtype=torch.int64, device=self.device)  # [1]
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=self.group)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.group)
        plan = RankPlan(pad_to_count(micro, max(int(count.item()), 1), lcfg.pad_token_id),
                        num_tokens=int(totals[0]), num_sequences=int(totals[1]))
        return self.step_planned(plan)

    def step_on_whole_batch(self, trajectories: Sequence[TrajectoryFields]) -> dict[str, float]:
        """One optimiser step from the WHOLE step's trajectories, identical on every rank (no count exchange)."""
        lcfg = self.cfg.learner
        plan = plan_step(trajectories, self.rank, self.world_size, lcfg.micro_batch_tokens, lcfg.pad_token_id)
        if not plan.micro_batches:
            plan.micro_batches = pad_to_count([], 1, lcfg.pad_token_id)
        return self.step_planned(plan)

    def step_planned(self, plan: RankPlan) -> dict[str, float]:
        """Run this rank's micro-batches with the step's global counts; every rank must pass as many."""
        loss_cfg = self.cfg.learner.loss
        normalizer = loss_normalizer(loss_cfg, plan.num_tokens, plan.num_sequences, self.cfg.sampling.max_new_tokens)
        metrics = StepMetrics()
        last = len(plan.micro_batches) - 1
        for index, micro_batch in enumerate(plan.micro_batches):
            batch = micro_batch.to(self.device)
            self.engine.set_gradient_accumulation_boundary(index == last)
            logprobs, entropy = self._token_logprobs(batch.input_ids, batch.targets, batch.mask)  # [B, S] fp32 each
            ref = (self.reference.logprobs(batch.input_ids, batch.targets, batch.mask)
                   if self.reference is not None else None)
            part = grpo_loss(logprobs, batch.behaviour_logprobs, batch.advantages, batch.mask, loss_cfg, normalizer,
                             ref_logprobs=ref, entropy=entropy)
            # DeepSpeed averages gradients over the learner ranks, but each rank's loss parts are
            # already shares of the global sum: scale back up so the reduced gradient is that sum's.
            self.engine.backward(part.loss * self.world_size, scale_wrt_gas=False)
            metrics.add(part)
            del logprobs, entropy
        lr = self.lr_scheduler.get_last_lr()[0]
        self.engine.step()
        out = metrics.reduce(self.group, self.device)
        grad_norm = self.engine.get_global_grad_norm()
        self.step_count += 1
        self.policy_version += 1
        out.update(
            step=float(self.step_count),
            lr=float(lr),
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            micro_batches=float(len(plan.micro_batches)),
            sequences=float(plan.num_sequences),
        )
        return out

    def _token_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """This micro-batch's forward: (logprobs with gradient, entropy without), each fp32 [B, S]."""
        if self.fused_logprobs:
            hidden = self.engine(input_ids, hidden_only=True)  # [B, S, H]
            return masked_token_logprobs(hidden, self.module.lm_head.weight, targets, mask, self.temperature,
                                         chunk_rows=self.logprob_chunk_rows, kernels=self.chunk_kernels)
        logits = self.engine(input_ids)  # [B, S, V]
        logprobs = token_logprobs(logits, targets, self.temperature)  # [B, S]
        with torch.no_grad():
            entropy = token_entropy(logits.detach(), self.temperature)  # [B, S]
        return logprobs, entropy

    def save_checkpoint(self, out_dir: str, data_position: dict[str, Any] | None = None) -> str:
        """Write a complete checkpoint under `out_dir` (collective); returns its directory."""
        from async_grpo.learner.checkpoint import save_checkpoint

        return save_checkpoint(self, out_dir, data_position or {}, keep=self.cfg.trainer.keep_checkpoints)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Restore a checkpoint written by `save_checkpoint` (collective); returns the data position."""
        from async_grpo.learner.checkpoint import load_checkpoint

        return load_checkpoint(self, path)
