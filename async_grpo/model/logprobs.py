"""Per-token log-probabilities and entropies from logits without an fp32 copy of the whole [B, S, V].

The learner's loss needs log p(target) for every completion token; the vocabulary dimension makes
`logits.float().log_softmax(-1)` the largest tensor of a step (B*S*V*4 bytes, twice with its gradient).
These functions walk the rows in chunks, upcast one chunk at a time, and keep only a per-row
log-normaliser for the backward pass, which recomputes each chunk's softmax in fp32. The gradient
w.r.t. the logits is one tensor in the logits' own dtype. `temperature` divides the logits first, so
the learner scores tokens under the same distribution the workers sampled from.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ROWS = 1024


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """logits [B, S, V] (any float dtype), targets [B, S] -> fp32 [B, S] of log softmax(logits / T)[target]."""
    _check(logits, temperature, chunk_rows)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets has shape {tuple(targets.shape)}: expected {tuple(logits.shape[:-1])} "
                         "(the logits' shape without the vocabulary)")
    flat = _TokenLogprobs.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), temperature, chunk_rows)
    return flat.view(targets.shape)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """logits [B, S, V] -> fp32 [B, S] entropy of softmax(logits / T) in nats."""
    _check(logits, temperature, chunk_rows)
    flat = _TokenEntropy.apply(logits.reshape(-1, logits.shape[-1]), temperature, chunk_rows)
    return flat.view(logits.shape[:-1])


def _check(logits: torch.Tensor, temperature: float, chunk_rows: int) -> None:
    if not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError(f"logits must be a floating tensor [..., V], got {logits.dtype} {tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature = {temperature}: expected > 0 (greedy decoding has no logprobs to train on)")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows = {chunk_rows}: expected >= 1")


def _chunks(rows: int, chunk_rows: int):
    for start in range(0, rows, chunk_rows):
        yield start, min(rows, start + chunk_rows)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float, chunk_rows: int):
        rows = logits.shape[0]
        out = torch.empty(rows, dtype=torch.float32, device=logits.device)  # [N]
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)  # [N]
        for a, b in _chunks(rows, chunk_rows):
            scaled = logits[a:b].float() / temperature  # [n, V], the only fp32 copy alive
            lse[a:b] = torch.logsumexp(scaled, dim=-1)
            out[a:b] = scaled.gather(1, targets[a:b, None]).squeeze(1) - lse[a:b]
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)  # [N, V] in the logits' dtype
        for a, b in _chunks(logits.shape[0], ctx.chunk_rows):
            probs = torch.exp(logits[a:b].float() / ctx.temperature - lse[a:b, None])  # [n, V]
            # d logp_t / d x_j = (1[j == t] - p_j) / T
            probs.neg_()
            probs.scatter_add_(1, targets[a:b, None], torch.ones_like(probs[:, :1]))
            grad[a:b] = probs * (grad_out[a:b, None].float() / ctx.temperature)
        return grad, None, None, None


class _TokenEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float, chunk_rows: int):
        rows = logits.shape[0]
        out = torch.empty(rows, dtype=torch.float32, device=logits.device)  # [N]
        for a, b in _chunks(rows, chunk_rows):
            logp = torch.log_softmax(logits[a:b].float() / temperature, dim=-1)  # [n, V]
            out[a:b] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(logits, out)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)  # [N, V]
        for a, b in _chunks(logits.shape[0], ctx.chunk_rows):
            logp = torch.log_softmax(logits[a:b].float() / ctx.temperature, dim=-1)  # [n, V]
            # dH / dx_j = -p_j (log p_j + H) / T
            g = -(logp.exp() * (logp + entropy[a:b, None]))
            grad[a:b] = g * (grad_out[a:b, None].float() / ctx.temperature)
        return grad, None, None
