"""Triton kernels behind `fused_ops.py`: the decode step's small elementwise ops, one launch each.

Each kernel reproduces the eager decoder's rounding, not just its maths: where the eager model
rounds an intermediate to the model dtype (bf16/fp16: every torch elementwise op does), the kernel
rounds it there too, and where the eager model works in fp32 (the RMS statistics) so does the
kernel. In fp32 the roundings are no-ops; in bf16 the outputs then agree with the eager model up to
the last-bit differences of exp / rsqrt / reduction order.

All kernels take 2-D row-major views (last dimension contiguous, any row stride) and launch a grid
fixed by the tensors' shapes, with no host sync, so they can be captured in a CUDA graph.
This module needs Triton; `fused_ops.py` imports it only when a kernel is going to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns of the gate/up product one silu-and-mul program handles.
SILU_BLOCK = 1024
# Smallest tile edge: tiny test shapes get masked lanes rather than tiles narrower than a warp's layout.
MIN_BLOCK = 16


def _num_warps(elements: int) -> int:
    """Warps for one program over `elements` values: enough lanes to load each value about once."""
    return max(1, min(16, elements // 256))


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    eps,
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
        # The eager residual add rounds to the model dtype before the norm reads it.
        s = (x + r).to(dtype)
        tl.store(res_out_ptr + row * stride_res_out + offs, s, mask=mask)
        x = s.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / N
    rstd = tl.rsqrt(mean_sq + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # As the eager RMSNorm: normalised in fp32, cast to the model dtype, then scaled by the weight.
    y = (x * rstd).to(dtype).to(tl.float32) * w
    tl.store(out_ptr + row * stride_out + offs, y.to(dtype), mask=mask)


def launch_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
    out: torch.Tensor, residual_out: torch.Tensor | None,
) -> None:
    """x, residual, out, residual_out [T, N] (last dim contiguous); weight [N]."""
    rows, n = x.shape
    if rows == 0:
        return
    has_res = residual is not None
    res = residual if has_res else x
    res_out = residual_out if has_res else out
    block = max(MIN_BLOCK, triton.next_power_of_2(n))
    _add_rms_norm_kernel[(rows,)](
        x, res, weight, out, res_out,
        x.stride(0), res.stride(0), out.stride(0), res_out.stride(0), eps,
        N=n, BLOCK_N=block, HAS_RESIDUAL=has_res, num_warps=_num_warps(block),
    )


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,
    out_ptr,
    stride_in,
    stride_out,
    I: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + row * stride_in + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + I + offs, mask=mask, other=0.0).to(tl.float32)
    # silu is rounded to the model dtype before the product, as F.silu(gate) * up rounds it.
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (act * up).to(dtype), mask=mask)


def launch_silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor) -> None:
    """gate_up [T, 2I] (gate columns first, then up), out [T, I]."""
    rows, inter = out.shape
    if rows == 0:
        return
    block = min(SILU_BLOCK, max(MIN_BLOCK, triton.next_power_of_2(inter)))
    _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), I=inter, BLOCK=block, num_warps=_num_warps(block),
    )


@triton.jit
def _rope_qk_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    q_norm_ptr,
    k_norm_ptr,
    q_out_ptr,
    k_out_ptr,
    stride_qkv,
    stride_cos,
    stride_sin,
    stride_q_out,
    stride_k_out,
    eps,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_QK_NORM: tl.constexpr,
):
    # One program per token: every q head and every k head of it, each as its two rotate-half halves.
    t = tl.program_id(0).to(tl.int64)
    dtype = q_out_ptr.dtype.element_ty
    heads = tl.arange(0, BLOCK_HEADS)  # q heads, then k heads: their columns follow each other in qkv
    offs = tl.arange(0, BLOCK_HALF)
    head_ok = heads < HQ + HKV
    mask = head_ok[:, None] & (offs < HALF)[None, :]  # [BLOCK_HEADS, BLOCK_HALF]
    src = qkv_ptr + t * stride_qkv + heads[:, None] * HEAD_DIM + offs[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)  # first half of each head
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)  # second half
    is_q = heads < HQ
    if HAS_QK_NORM:
        # Per-head RMSNorm (Qwen3) before the rotation, with the eager model's casts.
        mean_sq = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM
        rstd = tl.rsqrt(mean_sq + eps)[:, None]
        w_ok = (offs < HALF)[None, :]
        wq1 = tl.load(q_norm_ptr + offs[None, :], mask=w_ok, other=0.0).to(tl.float32)
        wq2 = tl.load(q_norm_ptr + HALF + offs[None, :], mask=w_ok, other=0.0).to(tl.float32)
        wk1 = tl.load(k_norm_ptr + offs[None, :], mask=w_ok, other=0.0).to(tl.float32)
        wk2 = tl.load(k_norm_ptr + HALF + offs[None, :], mask=w_ok, other=0.0).to(tl.float32)
        w1 = tl.where(is_q[:, None], wq1, wk1)
        w2 = tl.where(is_q[:, None], wq2, wk2)
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    # The eager tables hold cat(freqs, freqs): both halves of a row share one cos and one sin.
    col_ok = offs < HALF
    c = tl.load(cos_ptr + t * stride_cos + offs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + t * stride_sin + offs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # x * cos + rotate_half(x) * sin, each product and the sum rounded as the eager ops round them.
    o1 = ((x1 * c).to(dtype).to(tl.float32) + (-x2 * s).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)).to(dtype)
    q_dst = q_out_ptr + t * stride_q_out + heads[:, None] * HEAD_DIM + offs[None, :]
    q_mask = mask & is_q[:, None]
    tl.store(q_dst, o1, mask=q_mask)
    tl.store(q_dst + HALF, o2, mask=q_mask)
    k_dst = k_out_ptr + t * stride_k_out + (heads[:, None] - HQ) * HEAD_DIM + offs[None, :]
    k_mask = mask & ~is_q[:, None]
    tl.store(k_dst, o1, mask=k_mask)
    tl.store(k_dst + HALF, o2, mask=k_mask)


def launch_rope_qk(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int,
    q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
    q_out: torch.Tensor, k_out: torch.Tensor,
) -> None:
    """qkv [T, (Hq + 2 Hkv) D]; cos, sin [T, D]; q_out [T, Hq * D], k_out [T, Hkv * D]."""
    rows = qkv.shape[0]
    if rows == 0:
        return
    has_norm = q_norm_weight is not None
    block_heads = triton.next_power_of_2(num_q_heads + num_kv_heads)
    block_half = max(MIN_BLOCK, triton.next_power_of_2(head_dim // 2))
    _rope_qk_kernel[(rows,)](
        qkv, cos, sin, q_norm_weight if has_norm else cos, k_norm_weight if has_norm else cos, q_out, k_out,
        qkv.stride(0), cos.stride(0), sin.stride(0), q_out.stride(0), k_out.stride(0), eps,
        HQ=num_q_heads, HKV=num_kv_heads, HEAD_DIM=head_dim, HALF=head_dim // 2, BLOCK_HEADS=block_heads,
        BLOCK_HALF=block_half, HAS_QK_NORM=has_norm, num_warps=_num_warps(2 * block_heads * block_half),
    )
