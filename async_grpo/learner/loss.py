"""The GRPO policy loss on per-token tensors, with every variant's formula spelled out.

All tensors are laid out like the learner's micro-batches: `[B, S]` per token, right-padded, with a
boolean `mask` that is True on completion tokens only; advantages are one per sequence, `[B]`.
Notation per token t of sequence i (all log-probabilities fp32):

    logp      log pi_theta(o_it | ...)        current policy, carries the gradient
    logp_beh  log pi_behaviour(o_it | ...)    recorded by the rollout worker while sampling
    logp_prox log pi_prox(o_it | ...)         the policy at the start of this optimiser step (detached);
                                              defaults to logp.detach()
    A_i       group-relative advantage of sequence i (async_grpo.advantages)
    clip(x)   = min(max(x, 1 - eps_low), 1 + eps_high)          (DAPO clip-higher: eps_high > eps_low)

Surrogate per token, by `correction`:

  "none"  (GRPO / PPO against the behaviour policy; the clip is the trust region around pi_behaviour):
      r_it = exp(logp - logp_beh)
      L_it = -min(r_it * A_i, clip(r_it) * A_i)

  "tis"   (decoupled PPO objective, AReaL; truncated importance sampling for policy lag):
      r_it = exp(logp - logp_prox)                       the ratio that is CLIPPED
      w_it = min(exp(logp_prox - logp_beh), is_cap)      the weight that is TRUNCATED (no gradient)
      L_it = -w_it * min(r_it * A_i, clip(r_it) * A_i)
    The learner takes one optimiser update per batch, so logp_prox = logp.detach(): r_it = 1 in value,
    the clip is inactive and the gradient is -w_it * A_i * grad(logp). Staleness is then handled by w
    alone: tokens the current policy likes much more than the (older) behaviour policy are capped at
    is_cap. Passing an explicit `proximal_logprobs` (several updates per batch) activates the clip.

Optional KL to a frozen reference (k3 estimator, unbiased and always >= 0; Schulman 2020):
      k3_it = exp(logp_ref - logp) - (logp_ref - logp) - 1
      L_it += kl_beta * k3_it

Aggregation into the scalar loss, by `aggregation` (sums run over masked tokens of the WHOLE step:
every micro-batch of every learner rank; the caller passes the global normaliser so that the result
does not depend on how the step was packed or sharded):

  "token_mean"  sum_it L_it / N_tokens                                 (DAPO)
  "seq_mean"    sum_i (1/|o_i|) sum_t L_it / N_sequences               (original GRPO)
  "constant"    sum_it L_it / (N_sequences * C), C = constant_normalizer or max_new_tokens  (Dr.GRPO)

A micro-batch's loss is its part of that sum, so the parts add up to the step's loss exactly.

Metrics (sums, reduced by learner/metrics.py): the loss, the KL term, the fraction of tokens whose
clipped branch is active (gradient zero), approx_kl = k3 estimate of KL(pi_behaviour || pi_theta) from
the sampled tokens, mean entropy, the raw importance ratio pi_prox/pi_behaviour (mean and max, the
measure of policy lag) and, for "tis", the fraction of truncated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from async_grpo.config import LossConfig


@dataclass
class PolicyLoss:
    """One micro-batch's share of the step loss and its metric sums (all 0-d tensors)."""

    loss: torch.Tensor  # differentiable scalar
    sums: dict[str, torch.Tensor]  # additive over micro-batches and ranks
    maxes: dict[str, torch.Tensor]  # reduced with max


def loss_normalizer(cfg: LossConfig, num_tokens: int, num_sequences: int, max_new_tokens: int) -> float:
    """The denominator of the step loss for `cfg.aggregation`, from the GLOBAL token/sequence counts."""
    if cfg.aggregation == "token_mean":
        denominator = num_tokens
    elif cfg.aggregation == "seq_mean":
        denominator = num_sequences
    elif cfg.aggregation == "constant":
        constant = cfg.constant_normalizer if cfg.constant_normalizer is not None else max_new_tokens
        if constant < 1:
            raise ValueError(f"constant normaliser = {constant!r}: expected an integer >= 1")
        denominator = num_sequences * constant
    else:
        raise ValueError(f"loss.aggregation = {cfg.aggregation!r}: expected token_mean, seq_mean or constant")
    # An all-empty step (every sequence masked out) contributes zero loss; avoid dividing by zero.
    return float(max(denominator, 1))


def token_weights(mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """[B, S] fp32 weight of each token in the numerator: 1 per token, or 1/|o_i| for seq_mean."""
    weights = mask.to(torch.float32)  # [B, S]
    if aggregation == "seq_mean":
        lengths = weights.sum(dim=1, keepdim=True).clamp_min(1.0)  # [B, 1]
        weights = weights / lengths
    return weights


def _check_shapes(logprobs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, **others: torch.Tensor | None) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, S] per token, got shape {tuple(logprobs.shape)}")
    if mask.shape != logprobs.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logprobs shape {tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logprobs.shape[0]}], got shape {tuple(advantages.shape)}")
    for name, tensor in others.items():
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} != logprobs shape {tuple(logprobs.shape)}")


def grpo_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    normalizer: float,
    ref_logprobs: torch.Tensor | None = None,
    proximal_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> PolicyLoss:
    """This micro-batch's share of the step loss (formulas in the module docstring).

    logprobs, behaviour_logprobs, ref_logprobs, proximal_logprobs, entropy: [B, S] fp32;
    advantages: [B]; mask: [B, S] bool (completion tokens); normalizer: from `loss_normalizer`.
    """
    _check_shapes(
        logprobs, mask, advantages,
        behaviour_logprobs=behaviour_logprobs, ref_logprobs=ref_logprobs,
        proximal_logprobs=proximal_logprobs, entropy=entropy,
    )
    if cfg.kl_beta > 0 and ref_logprobs is None:
        raise ValueError(f"loss.kl_beta = {cfg.kl_beta}: expected ref_logprobs from a reference model, got None")
    mask = mask.bool()
    logp = logprobs.float()
    # Padding may hold anything (even -inf); zero it so no NaN can leak through exp or 0 * inf.
    logp_beh = torch.where(mask, behaviour_logprobs.float(), 0.0)
    logp = torch.where(mask, logp, 0.0)
    adv = advantages.float()[:, None]  # [B, 1]
    prox = logp.detach() if proximal_logprobs is None else torch.where(mask, proximal_logprobs.float(), 0.0)

    if cfg.correction == "none":
        ratio = torch.exp(logp - logp_beh)  # [B, S]
        weight = torch.ones_like(ratio)
    elif cfg.correction == "tis":
        ratio = torch.exp(logp - prox)
        weight = torch.exp(prox - logp_beh).clamp(max=cfg.is_cap).detach()
    else:
        raise ValueError(f"loss.correction = {cfg.correction!r}: expected 'none' or 'tis'")
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * adv
    per_token = -weight * torch.minimum(unclipped, clipped)  # [B, S]

    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None and cfg.kl_beta > 0:
        log_ref_ratio = torch.where(mask, ref_logprobs.float(), 0.0) - logp
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0  # [B, S] k3 >= 0
        per_token = per_token + cfg.kl_beta * kl

    weights = token_weights(mask, cfg.aggregation) / normalizer  # [B, S]
    loss = (per_token * weights).sum()

    with torch.no_grad():
        fmask = mask.float()
        raw_ratio = torch.exp(prox - logp_beh) * fmask
        log_beh_ratio = logp.detach() - logp_beh
        sums = {
            "loss": loss.detach(),
            "kl": (kl.detach() * weights).sum(),
            "tokens": fmask.sum(),
            "clipped": ((clipped < unclipped).float() * fmask).sum(),
            "approx_kl": ((torch.exp(log_beh_ratio) - log_beh_ratio - 1.0) * fmask).sum(),
            "entropy": (entropy.float() * fmask).sum() if entropy is not None else torch.zeros((), device=fmask.device),
            "is_weight": raw_ratio.sum(),
            "truncated": ((raw_ratio > cfg.is_cap).float() * fmask).sum()
            if cfg.correction == "tis" else torch.zeros((), device=fmask.device),
        }
        maxes = {"is_weight_max": raw_ratio.max() if raw_ratio.numel() else torch.zeros((), device=fmask.device)}
    return PolicyLoss(loss=loss, sums=sums, maxes=maxes)
