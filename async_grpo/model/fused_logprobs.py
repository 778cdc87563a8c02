"""The learner's lm_head fused with token logprobs and entropy, at completion positions only.

`model/logprobs.py` scores logits the decoder has already made: a `[B, S, V]` tensor for every
position, prompt and padding included, read again by the logprob pass, the entropy pass and their
backward. Here the learner hands over the final hidden states instead. Only the masked rows (the
completion tokens the loss reads) are gathered, `[M, H]`, and walked in row chunks:

    logits_c = h_c @ W^T                     [n, V] in the model's dtype (W = lm_head weight, tied or not)
    z        = float(logits_c) / T           [n, V] fp32, the only wide fp32 tensor alive
    lse      = logsumexp(z)                  per row
    logp     = z[target] - lse
    entropy  = -sum_j p_j log p_j,  log p = z - lse   (no gradient: a metric)

The autograd node keeps only h, the targets and the per-row lse. Backward recomputes each chunk's
logits and turns them straight into gradients, so no `[M, V]` tensor outlives its chunk:

    grad_z      = g * (onehot(target) - p)           d logp / d z
    grad_logits = grad_z / T                         cast to the model's dtype
    grad_h_c    = grad_logits @ W
    grad_W     += grad_logits^T @ h_c                summed in fp32 when there are several chunks

The per-row results are scattered back to `[B, S]` (zeros off the mask), so `learner/loss.py` reads
the same layout as before. The learner's model is never tensor-parallel (W is the whole vocabulary).
On CUDA the per-chunk elementwise work (cast, scale, logsumexp, gather, entropy; the softmax-gradient)
can run through `torch.compile`, which fuses those passes over `[n, V]` into a few kernels.
"""

from __future__ import annotations

from typing import Callable

import torch

# fp32 MiB of one chunk's [n, V] logits: n = budget / (4 V), e.g. 1,766 rows for a 151,936 vocabulary.
DEFAULT_CHUNK_MB = 1024

ChunkStatsFn = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
ChunkGradFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def chunk_rows_for(vocab_size: int, chunk_mb: int = DEFAULT_CHUNK_MB) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about `chunk_mb` MiB."""
    if vocab_size < 1 or chunk_mb < 1:
        raise ValueError(f"vocab_size = {vocab_size}, chunk_mb = {chunk_mb}: expected both >= 1")
    return max(1, (chunk_mb << 20) // (4 * vocab_size))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 for half types; fp64 stays fp64 (exact tests against plain autograd).
    return torch.promote_types(dtype, torch.float32)


def chunk_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [n, V], targets [n] -> (lse, target logprob, entropy), each [n] in fp32 (or fp64)."""
    z = logits.to(_compute_dtype(logits.dtype)) / temperature  # [n, V]
    lse = torch.logsumexp(z, dim=-1)  # [n]
    logp = z.gather(1, targets[:, None]).squeeze(1) - lse  # [n]
    shifted = z - lse[:, None]  # [n, V] log p
    # -sum p log p rather than lse - sum p z: no cancellation when the entropy is small
    entropy = -(torch.exp(shifted) * shifted).sum(-1)  # [n]
    return lse, logp, entropy


def chunk_logit_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """d(sum g * logp)/d logits for one chunk: [n, V] in the logits' dtype."""
    z = logits.to(lse.dtype) / temperature  # [n, V]
    grad_z = torch.exp(z - lse[:, None]) * -grad_logp[:, None]  # [n, V]
    grad_z = grad_z.scatter_add(1, targets[:, None], grad_logp[:, None])
    return (grad_z / temperature).to(logits.dtype)


class ChunkKernels:
    """The two per-chunk functions, eager or compiled (CUDA); compiled ones are built once per process."""

    _compiled: tuple[ChunkStatsFn, ChunkGradFn] | None = None

    def __init__(self, compiled: bool = False):
        self.stats: ChunkStatsFn = chunk_stats
        self.grad: ChunkGradFn = chunk_logit_grad
        if compiled:
            if ChunkKernels._compiled is None:
                # dynamic: the last chunk of every micro-batch has its own row count.
                ChunkKernels._compiled = (torch.compile(chunk_stats, dynamic=True),
                                          torch.compile(chunk_logit_grad, dynamic=True))
            self.stats, self.grad = ChunkKernels._compiled


EAGER = ChunkKernels(compiled=False)


def _chunks(rows: int, chunk_rows: int):
    for start in range(0, rows, chunk_rows):
        yield start, min(rows, start + chunk_rows)


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                chunk_rows: int, kernels: ChunkKernels):
        rows = hidden.shape[0]
        acc = _compute_dtype(hidden.dtype)
        lse = torch.empty(rows, dtype=acc, device=hidden.device)  # [M]
        logp = torch.empty(rows, dtype=acc, device=hidden.device)  # [M]
        entropy = torch.empty(rows, dtype=acc, device=hidden.device)  # [M]
        for a, b in _chunks(rows, chunk_rows):
            logits = hidden[a:b] @ weight.t()  # [n, V] model dtype
            lse[a:b], logp[a:b], entropy[a:b] = kernels.stats(logits, targets[a:b], temperature)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk_rows, ctx.kernels = temperature, chunk_rows, kernels
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, _grad_entropy: torch.Tensor | None):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)  # [M, H]
        grad_weight: torch.Tensor | None = None  # [V, H]
        grad_logp = grad_logp.to(lse.dtype)
        for a, b in _chunks(hidden.shape[0], ctx.chunk_rows):
            logits = hidden[a:b] @ weight.t()  # [n, V], recomputed instead of kept
            grad_logits = ctx.kernels.grad(logits, targets[a:b], lse[a:b], grad_logp[a:b], ctx.temperature)
            grad_hidden[a:b] = grad_logits @ weight
            part = grad_logits.t() @ hidden[a:b]  # [V, H] model dtype
            if grad_weight is None:
                grad_weight = part
            else:
                # Summed over chunks in fp32: bf16 partial sums would each round away low bits.
                grad_weight = grad_weight.to(lse.dtype).add_(part)
        if grad_weight is None:
            # No rows: a zero gradient rather than None, so every parameter's ZeRO gradient hook still fires.
            grad_weight = torch.zeros_like(weight)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def masked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    kernels: ChunkKernels = EAGER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, S, H], weight [V, H], targets/mask [B, S] -> (logprobs, entropy), each fp32 [B, S].

    logprobs = log softmax(hidden @ weight^T / T)[target] where mask is True, 0 elsewhere; it carries
    gradients to `hidden` and `weight`. entropy (nats, same layout) carries none.
    """
    _check(hidden, weight, targets, mask, temperature, chunk_rows)
    batch, seq, width = hidden.shape
    rows = torch.nonzero(mask.reshape(-1), as_tuple=False).squeeze(1)  # [M]
    picked = hidden.reshape(batch * seq, width).index_select(0, rows)  # [M, H]
    picked_targets = targets.reshape(-1).index_select(0, rows)  # [M]
    chunk = chunk_rows if chunk_rows is not None else chunk_rows_for(weight.shape[0])
    logp, entropy = _LinearTokenLogprobs.apply(picked, weight, picked_targets, temperature, chunk, kernels)
    out_dtype = torch.promote_types(logp.dtype, torch.float32)
    # Scattered into zeros: the loss zeroes off-mask positions anyway, and its layout stays [B, S].
    full_logp = torch.zeros(batch * seq, dtype=out_dtype, device=hidden.device).index_copy(0, rows, logp)
    full_entropy = torch.zeros(batch * seq, dtype=out_dtype, device=hidden.device).index_copy(0, rows, entropy)
    return full_logp.view(batch, seq), full_entropy.view(batch, seq)


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
           temperature: float, chunk_rows: int | None) -> None:
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating tensor [B, S, H], got {hidden.dtype} {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"lm_head weight has shape {tuple(weight.shape)}: expected [V, {hidden.shape[2]}] "
                         "(the hidden size of `hidden`)")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"lm_head weight is {weight.dtype} but hidden is {hidden.dtype}: expected one dtype")
    if targets.shape != hidden.shape[:2] or mask.shape != hidden.shape[:2]:
        raise ValueError(f"targets {tuple(targets.shape)} and mask {tuple(mask.shape)}: expected both "
                         f"{tuple(hidden.shape[:2])} (the hidden states' [B, S])")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask is {mask.dtype}: expected torch.bool (True on completion tokens)")
    if temperature <= 0:
        raise ValueError(f"temperature = {temperature}: expected > 0 (greedy decoding has no logprobs to train on)")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows = {chunk_rows}: expected >= 1")
