"""Next-token sampling for the rollout engine, and the logprob GRPO needs for each sampled token.

The recorded logprob is the fp32 log-probability of the sampled token under the distribution that
was actually sampled from: logits / temperature, then top-k, then top-p, renormalised. Recording it
before these transforms would make the learner's importance ratios wrong from the first step.

Greedy (temperature 0) has no distribution to sample from; it takes the argmax and records the
model's own log_softmax at it (the limit of "after temperature" would be a constant 0, which
carries no information).

All rows are processed together. The draw is the exponential race (argmax of p / E with E ~ Exp(1)),
which samples exactly from p, needs no host sync, and takes its noise from one seeded generator.
"""

from __future__ import annotations

import torch

from async_grpo.config import SamplingConfig


def transformed_logprobs(logits: torch.Tensor, params: SamplingConfig) -> torch.Tensor:
    """fp32 log-probabilities [R, V] of the distribution sampled from (temperature > 0)."""
    scaled = logits.float() / params.temperature  # [R, V]
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]  # [R, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        probs = torch.softmax(scaled, dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # [R, V]
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def sample_tokens(
    logits: torch.Tensor, params: SamplingConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of `logits` [R, V]; return (token ids int64 [R], logprobs fp32 [R])."""
    if logits.dim() != 2:
        raise ValueError(f"logits of shape {tuple(logits.shape)}: expected [rows, vocab]")
    if params.temperature == 0:
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
        tokens = torch.argmax(logprobs, dim=-1)  # [R]
    else:
        logprobs = transformed_logprobs(logits, params)  # [R, V]
        noise = torch.empty_like(logprobs).exponential_(generator=generator)  # [R, V]
        # Exp(1) draws can be exactly 0 in fp32; log(0) against a masked -inf would make NaN.
        noise.clamp_min_(torch.finfo(torch.float32).tiny)
        # argmax(p / E) == argmax(logp - log E); masked tokens have logp = -inf and never win.
        tokens = torch.argmax(logprobs - noise.log(), dim=-1)  # [R]
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on the logits' device, seeded when `seed` is given (else from the global RNG)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
