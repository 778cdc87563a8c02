"""Write new tokens' K/V rows into their paged-cache slots (Triton).

Every forward step of the rollout engine (prefill and decode) produces K and V for T new tokens,
flattened over sequences with no padding. The engine maps each token to a slot
`block_id * block_size + offset` of the pool; this kernel stores token t's `[num_kv_heads, head_dim]`
rows at that slot in one pass, before attention reads the cache in place. A negative slot means
"do not store" (a token whose KV must not enter the cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from async_grpo.kv.triton_paged import check_cache_pair, triton_attention_available


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache,
    v_cache,
    slot_mapping,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ckb,
    stride_ckt,
    stride_ckh,
    stride_cvb,
    stride_cvt,
    stride_cvh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    if slot >= 0:
        blk = slot // PAGE
        off = slot % PAGE
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)  # [BLOCK_H, BLOCK_D]
        v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        tl.store(
            k_cache + blk * stride_ckb + off * stride_ckt + offs_h[:, None] * stride_ckh + offs_d[None, :], k, mask=mask
        )
        tl.store(
            v_cache + blk * stride_cvb + off * stride_cvt + offs_h[:, None] * stride_cvh + offs_d[None, :], v, mask=mask
        )


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store k[t], v[t] ([T, Hkv, D]) at slot slot_mapping[t] of k_cache/v_cache ([num_blocks, block_size, Hkv, D]).

    slot = block_id * block_size + offset; slot_mapping is int32 or int64 [T]; a negative slot skips
    the token. k/v must have the caches' dtype (no silent down-cast of the new rows).
    """
    where = "write_kv"
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"{where}: k {tuple(k.shape)} / v {tuple(v.shape)}: expected both [T, num_kv_heads, head_dim]")
    check_cache_pair(k_cache, v_cache, where)
    T, H, D = k.shape
    if tuple(k_cache.shape[2:]) != (H, D):
        raise ValueError(f"{where}: new rows are [{H}, {D}] per token but the cache holds {tuple(k_cache.shape[2:])}")
    if slot_mapping.shape != (T,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{where}: slot_mapping has shape {tuple(slot_mapping.shape)} dtype {slot_mapping.dtype}: "
            f"expected int32/int64 [{T}]"
        )
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise ValueError(f"{where}: k/v dtype {k.dtype}/{v.dtype} != cache dtype {k_cache.dtype}: cast before writing")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"{where}: head_dim must be the contiguous (last, stride 1) dimension")
    if not (k.device == v.device == k_cache.device == v_cache.device == slot_mapping.device):
        raise ValueError(f"{where}: tensors are on different devices")
    if not triton_attention_available(k.device):
        raise ValueError(f"{where}: tensors on {k.device}: Triton kernels need CUDA (or TRITON_INTERPRET=1)")
    if T == 0:
        return
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=H, HEAD_DIM=D, BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D),
        PAGE=k_cache.shape[1], num_warps=1 if H * D <= 512 else 4,
    )
