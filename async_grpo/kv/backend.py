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

Shared-prefix ("cascade") decode (`kv.shared_prefix`, kv/shared_prefix.py) is a Triton-backend
path: when a decode step's metadata carries `shared_prefix`, each group's shared prompt blocks are
read once for all its samples. `shared_prefix_mode` resolves the setting against the backend.
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
SHARED_PREFIX_BACKENDS = ("triton",)
SHARED_PREFIX_MODES = ("auto", "on", "off")
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


def shared_prefix_mode(requested: str, backend: str) -> str:
    """Resolve `kv.shared_prefix` for `backend`: "on", "auto" (decided per step) or "off".

    "auto" on a backend without the shared-prefix kernel is "off"; "on" there is a ValueError.
    """
    if requested not in SHARED_PREFIX_MODES:
        raise ValueError(f"kv.shared_prefix = {requested!r}: expected one of {SHARED_PREFIX_MODES}")
    if backend in SHARED_PREFIX_BACKENDS or requested == "off":
        return requested
    if requested == "on":
        raise ValueError(
            f"kv.shared_prefix = 'on' needs the attention backend to be one of {SHARED_PREFIX_BACKENDS}, "
            f"but this engine uses {backend!r}; set kv.attention = 'triton' or kv.shared_prefix = 'auto'"
        )
    return "off"


def shared_prefix_splits(
    num_rows: int,
    max_group_rows: int,
    num_q_heads: int,
    num_kv_heads: int,
    max_prefix_tokens: int,
    num_sms: int,
    gluon: bool = False,
) -> int:
    """Splits of the shared-prefix kernel for a step of `num_rows` rows, from sizes fixed per graph bucket.

    The kernel runs programs for every group slot, a bound fixed per graph bucket, but the rows
    usually fill about num_rows / max_group_rows groups; the other slots exit at once. Splits are
    chosen to fit the busy ones in one wave, as `choose_prefix_splits` would for that many groups, of the
    Gluon prefix kernel's programs with `gluon`, else of the Triton kernel's.
    """
    from async_grpo.kv.gluon_prefix import GLUON_PROGRAMS_PER_SM
    from async_grpo.kv.shared_prefix import choose_prefix_splits, prefix_tile_rows

    rows_per_group = max_group_rows * (num_q_heads // num_kv_heads)
    tile = prefix_tile_rows(rows_per_group)
    row_tiles = -(-rows_per_group // tile)
    busy_groups = -(-num_rows // max_group_rows)
    per_sm = GLUON_PROGRAMS_PER_SM if gluon else None
    return choose_prefix_splits(busy_groups * row_tiles * num_kv_heads, tile, max_prefix_tokens, num_sms, per_sm)


class TritonDecodeAttention:
    """Fused Triton kernels for decode steps (plain or shared-prefix); the torch reference for multi-token steps."""

    def __init__(self, pool: KVPool, meta: StepMetadata):
        from async_grpo.kv.shared_prefix import GroupLayout, shared_prefix_decode_attention, use_hopper_prefix
        from async_grpo.kv.triton_kv_write import write_kv
        from async_grpo.kv.triton_paged import DEFAULT_SM_COUNT, paged_decode_attention, sm_count

        self.pool, self.meta = pool, meta
        self._write_kv, self._decode, self._cascade = write_kv, paged_decode_attention, shared_prefix_decode_attention
        self._use_hopper_prefix = use_hopper_prefix
        self._fallback = None if meta.is_decode else TorchPagedAttention(pool, meta)
        self._layout = None
        shared = meta.shared_prefix
        if self._fallback is None and shared is not None:
            g = shared.groups
            # Built once per step from the step's buffers; every layer reuses it.
            self._layout = GroupLayout(order=g.order, starts=g.starts, counts=g.counts, max_live=g.max_live)
            dev = meta.block_tables.device
            self._num_sms = sm_count(dev.index) if dev.type == "cuda" else DEFAULT_SM_COUNT
            self._prefix_splits: int | None = None
            self._prefix_kernel = "triton"

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self._fallback is not None:
            return self._fallback.attend(layer, q, k, v)
        k_cache, v_cache = self.pool.key_cache[layer], self.pool.value_cache[layer]
        self._write_kv(k.to(k_cache.dtype), v.to(v_cache.dtype), k_cache, v_cache, self.meta.slot_mapping)
        scale = q.shape[-1] ** -0.5
        if self._layout is not None:
            return self._attend_shared(q, k_cache, v_cache, scale)
        out = self._decode(q.to(k_cache.dtype), k_cache, v_cache, self.meta.block_tables, self.meta.context_lens, scale)
        return out.to(q.dtype)  # [B, Hq, D]

    def _attend_shared(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        meta, shared = self.meta, self.meta.shared_prefix
        assert shared is not None and self._layout is not None
        out_dtype = q.dtype
        q = q.to(k_cache.dtype)
        if self._prefix_splits is None:  # once per step: every layer has the same shapes
            max_tokens = meta.block_tables.shape[1] * meta.block_size
            gluon = self._use_hopper_prefix("auto", q, k_cache, v_cache, max_tokens)
            self._prefix_kernel = "gluon" if gluon else "triton"
            self._prefix_splits = shared_prefix_splits(
                meta.num_seqs, self._layout.max_live, q.shape[1], k_cache.shape[2], max_tokens, self._num_sms, gluon,
            )
        g = shared.groups
        out = self._cascade(
            q, k_cache, v_cache, g.prefix_block_tables, g.prefix_lens, self._layout,
            shared.suffix_block_tables, shared.suffix_lens, scale, prefix_splits=self._prefix_splits,
            prefix_kernel=self._prefix_kernel,
        )
        return out.to(out_dtype)  # [B, Hq, D]


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
