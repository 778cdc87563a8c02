"""Which paged-attention implementation a rollout engine uses, and the per-step objects it hands the model.

- "torch": kv/torch_attention.py, everywhere (the CPU path and the reference).
- "triton": on CUDA when triton and kv/triton_paged.py import (or, asked for by name, on CPU under
  the Triton interpreter, which tests use). Decode steps (one new token per
  sequence) run the fused paged kernel, which reads K/V in place through the block table; steps
  that feed several tokens per sequence (prefill, re-prefill after a weight update) use the reference.
- "flash": when flash_attn imports and the block size is a multiple of 256 (flash-attn's paged KV
  requirement): one varlen call with a block table serves prefill and decode alike.

`kv.attention = "auto"` picks the first that applies in that order; naming one that cannot run here
is a ValueError saying why.

The engine's decode step can be captured in a CUDA graph only with a backend whose decode
attention has fixed shapes for a fixed batch, launches no host sync and skips padding rows
(negative slot, zero context): `graph_capturable` says which. The torch reference sizes its
gather by the step's longest context and flash-attn takes host-side maxima, so both run eagerly.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from async_grpo.kv.pool import KVPool
from async_grpo.kv.step_metadata import StepMetadata
from async_grpo.kv.torch_attention import TorchPagedAttention
from async_grpo.model.attention_api import PagedAttention

BACKENDS = ("torch", "triton", "flash")
GRAPH_CAPTURABLE = ("triton",)
FLASH_BLOCK_MULTIPLE = 256


def _triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import async_grpo.kv.triton_kv_write  # noqa: F401
        import async_grpo.kv.triton_paged  # noqa: F401
    except ImportError:
        return False
    return True


def _flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _unavailable_reason(name: str, device: torch.device, block_size: int) -> str | None:
    if name == "torch":
        return None
    if name == "triton":
        if not _triton_available():
            return "triton or async_grpo.kv.triton_paged does not import"
        from async_grpo.kv.triton_paged import triton_attention_available

        # The interpreter (TRITON_INTERPRET=1) runs the same kernels on CPU, slowly: for tests only.
        if not triton_attention_available(device):
            return f"it needs a CUDA device (or TRITON_INTERPRET=1), and the engine runs on '{device}'"
        return None
    if name == "flash":
        if device.type != "cuda":
            return f"it needs a CUDA device, and the engine runs on '{device}'"
        if not _flash_available():
            return "flash_attn is not installed"
        if block_size % FLASH_BLOCK_MULTIPLE:
            return f"kv.block_size = {block_size} is not a multiple of {FLASH_BLOCK_MULTIPLE}"
        return None
    raise ValueError(f"kv.attention = {name!r}: expected 'auto' or one of {BACKENDS}")


def select_backend(requested: str, device: torch.device | str, block_size: int) -> str:
    """Resolve `kv.attention` ("auto" or a name) to a backend that can run on `device`."""
    device = torch.device(device)
    if requested == "auto":
        if device.type == "cuda":
            for name in ("triton", "flash"):
                if _unavailable_reason(name, device, block_size) is None:
                    return name
        return "torch"
    reason = _unavailable_reason(requested, device, block_size)
    if reason is not None:
        raise ValueError(f"kv.attention = {requested!r} cannot run: {reason}")
    return requested


def graph_capturable(backend: str) -> bool:
    """Whether `backend`'s decode step may be captured in a CUDA graph (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {BACKENDS}")
    return backend in GRAPH_CAPTURABLE


class TritonDecodeAttention:
    """Fused Triton kernels for decode steps; the torch reference for multi-token steps."""

    def __init__(self, pool: KVPool, meta: StepMetadata):
        from async_grpo.kv.triton_kv_write import write_kv
        from async_grpo.kv.triton_paged import paged_decode_attention

        self.pool, self.meta = pool, meta
        self._write_kv, self._decode = write_kv, paged_decode_attention
        self._fallback = None if meta.is_decode else TorchPagedAttention(pool, meta)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self._fallback is not None:
            return self._fallback.attend(layer, q, k, v)
        k_cache, v_cache = self.pool.key_cache[layer], self.pool.value_cache[layer]
        self._write_kv(k.to(k_cache.dtype), v.to(v_cache.dtype), k_cache, v_cache, self.meta.slot_mapping)
        scale = q.shape[-1] ** -0.5
        out = self._decode(q.to(k_cache.dtype), k_cache, v_cache, self.meta.block_tables, self.meta.context_lens, scale)
        return out.to(q.dtype)  # [B, Hq, D]


class FlashPagedAttention:
    """flash-attn's varlen kernel reading the pool through the block table (prefill and decode)."""

    def __init__(self, pool: KVPool, meta: StepMetadata):
        from flash_attn import flash_attn_varlen_func

        self.pool, self.meta = pool, meta
        self._attn = flash_attn_varlen_func
        ctx = meta.context_lens
        self._cu_k = torch.zeros(ctx.shape[0] + 1, dtype=torch.int32, device=ctx.device)  # [B + 1]
        self._cu_k[1:] = torch.cumsum(ctx, 0)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.pool.key_cache[layer], self.pool.value_cache[layer]
        kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, kv_heads, head_dim).index_copy_(0, self.meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, kv_heads, head_dim).index_copy_(0, self.meta.slot_mapping, v.to(v_cache.dtype))
        # Causal alignment is bottom-right (flash-attn >= 2.1): new tokens sit at the end of their context.
        return self._attn(
            q,
            k_cache,
            v_cache,
            cu_seqlens_q=self.meta.cu_query_lens,
            cu_seqlens_k=self._cu_k,
            max_seqlen_q=self.meta.max_query_len,
            max_seqlen_k=self.meta.max_context_len,
            causal=True,
            block_table=self.meta.block_tables,
        )


_STEP_ATTENTION: dict[str, Callable[[KVPool, StepMetadata], PagedAttention]] = {
    "torch": TorchPagedAttention,
    "triton": TritonDecodeAttention,
    "flash": FlashPagedAttention,
}


def step_attention(backend: str, pool: KVPool, meta: StepMetadata) -> PagedAttention:
    """The `PagedAttention` the model uses for one forward step."""
    return _STEP_ATTENTION[backend](pool, meta)
