"""Fused paged decode attention (Triton): one new query token per sequence against its paged KV.

The rollout engine's decode step calls `paged_decode_attention` once per layer with the query of
every live sequence. K and V are read in place through each sequence's block table (no gather into
a new tensor). The work is split three ways:

- query heads that share a KV head are one program's rows, so each K/V tile is loaded once per KV
  head and scored by a `[rows, D] x [D, BLOCK_N]` tensor-core dot (rows padded to at least 16);
- a sequence's tokens are cut into `num_splits` contiguous ranges ("flash decoding") so that a few
  long sequences still fill every multiprocessor; each split writes a partial output and its
  log-sum-exp, and a second small kernel merges the splits exactly;
- a tile spans `BLOCK_N` tokens, i.e. several cache blocks, with head_dim contiguous in memory.

Inputs are fp32, fp16 or bf16; scores, softmax statistics and the accumulator are fp32. The
log-sum-exp (natural log, of the scaled scores) can be returned so that partial attentions over
disjoint token sets merge exactly (`merge_attention_partials`, used by the shared-prefix kernel).

Cache layout (fixed by the KV pool): per layer K and V `[num_blocks, block_size, num_kv_heads,
head_dim]`; block tables int32 `[B, max_blocks_per_seq]`; context lengths int32 `[B]`; query head h
reads KV head `h // (num_q_heads // num_kv_heads)`.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

# Used when no CUDA device is there to ask (interpreter runs); the H200 has 132.
DEFAULT_SM_COUNT = 132
# Below this many tokens per split the merge costs more than the extra parallelism gains.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64
# Tokens per K/V tile: 128 spans eight 16-token cache blocks (measured faster than 64 on H200 at 1k and 4k).
DEFAULT_BLOCK_N = 128
LOG2E = 1.4426950408889634

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1) instead of compiling for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_attention_available(device: torch.device | str) -> bool:
    """Whether these kernels can run on tensors of `device`: a CUDA device, or any device under the interpreter."""
    return torch.device(device).type == "cuda" or interpreting()


@functools.lru_cache(maxsize=None)
def programmatic_launch_available(device: torch.device) -> bool:
    """Whether a kernel on `device` can start before the previous one ends (programmatic dependent launch).

    Needs a compiled kernel (not the interpreter, which runs programs one by one) on compute capability 9.0+.
    """
    if interpreting() or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(programmatic: bool = False, maxnreg: int | None = None) -> dict:
    """Optional Triton launch keywords: a programmatic dependent launch, a register cap per thread."""
    options: dict = {}
    if programmatic:
        options["launch_pdl"] = True
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return options


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int | None = None) -> int:
    """Number of streaming multiprocessors of a CUDA device (DEFAULT_SM_COUNT without CUDA)."""
    if not torch.cuda.is_available():
        return DEFAULT_SM_COUNT
    index = torch.cuda.current_device() if device_index is None else device_index
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(parallel_programs: int, max_context: int, num_sms: int = DEFAULT_SM_COUNT) -> int:
    """Splits per sequence so that `parallel_programs * splits` fills the GPU about twice over.

    `parallel_programs` is the work there is without splitting (B * num_kv_heads for the plain
    kernel); `max_context` bounds a sequence's token count (from the block table's width, so no
    device sync is needed). A split never gets fewer than MIN_TOKENS_PER_SPLIT tokens.
    """
    if parallel_programs < 1:
        raise ValueError(f"parallel_programs = {parallel_programs}: expected at least 1")
    target = 2 * num_sms
    if parallel_programs >= target:
        return 1
    wanted = triton.cdiv(target, parallel_programs)
    by_length = max(1, triton.cdiv(max_context, MIN_TOKENS_PER_SPLIT))
    return max(1, min(wanted, by_length, MAX_SPLITS))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for a cache dtype."""
    # fp32 caches are the exactness reference: keep their dots out of tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether the kernels widen K/V/Q tiles to fp32 before their dots."""
    # The CPU interpreter computes bf16 dots wrongly; there the tiles are widened to fp32 after loading.
    return interpreting() and dtype == torch.bfloat16


def offsets_fit_int32(*tensors: torch.Tensor) -> bool:
    """Whether every element offset of each tensor (from its strides) is below 2^31, so kernels may index in int32."""
    return all(sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0) < 2**31 for t in tensors)


@triton.jit
def attend_token_range(
    q,  # [ROWS, BLOCK_D] query tile, already loaded
    k_cache,
    v_cache,
    table_ptr,  # this owner's block-table row
    start,
    end,
    kv_head,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    qk_scale_log2,
    offs_d,
    mask_d,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    OFFS_I32: tl.constexpr,
):
    """Online softmax of the query rows over tokens [start, end) of one paged sequence.

    Whole tiles run without masks (no per-token bounds checks or score selects); a last partial tile,
    if any, runs masked. Returns (acc [ROWS, BLOCK_D] unnormalised output, m [ROWS] running max in
    log2 units, l [ROWS] running sum of exp2(score - m)).
    """
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    full_end = whole_tiles_end(start, end, BLOCK_N)
    for n0 in range(start, full_end, BLOCK_N):
        tok = n0 + offs_n
        # One block id per token: a tile spans several cache blocks; repeated ids hit L1.
        blk = tl.load(table_ptr + tok // PAGE)
        k, v = load_kv_pages(k_cache, v_cache, blk, tok, kv_head, stride_kb, stride_kt, stride_kh, stride_vb,
                             stride_vt, stride_vh, offs_d, mask_d, PAGE, HEAD_DIM == BLOCK_D, OFFS_I32)
        acc, m_i, l_i = online_softmax_tile(q, k, v, offs_n, acc, m_i, l_i, qk_scale_log2, DOT_PRECISION, UPCAST,
                                            False)
    if full_end < end:
        k, v, valid = load_kv_tile(k_cache, v_cache, table_ptr, full_end, end, kv_head, stride_kb, stride_kt,
                                   stride_kh, stride_vb, stride_vt, stride_vh, offs_n, offs_d, mask_d, PAGE, OFFS_I32)
        acc, m_i, l_i = online_softmax_tile(q, k, v, valid, acc, m_i, l_i, qk_scale_log2, DOT_PRECISION, UPCAST,
                                            True)
    return acc, m_i, l_i


@triton.jit
def whole_tiles_end(start, end, BLOCK_N: tl.constexpr):
    """End of the whole BLOCK_N-token tiles of [start, end): the unmasked part of the range (start if empty)."""
    return start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N


@triton.jit
def kv_offsets(blk, tok, kv_head, stride_b, stride_t, stride_h, offs_d, PAGE: tl.constexpr, OFFS_I32: tl.constexpr):
    """Element offsets [BLOCK_N, BLOCK_D] of tokens `tok` (in cache blocks `blk`) of one KV head.

    int32 when the host found every offset of the cache below 2^31 (`offsets_fit_int32`): the 64-bit
    multiply-adds of each element's address are a tenth of the prefix loop's instructions.
    """
    slot = tok % PAGE
    if OFFS_I32:
        row = blk * stride_b + slot * stride_t + kv_head * stride_h
    else:
        row = blk.to(tl.int64) * stride_b + slot * stride_t + kv_head * stride_h
    return row[:, None] + offs_d[None, :]


@triton.jit
def load_kv_pages(k_cache, v_cache, blk, tok, kv_head, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                  stride_vh, offs_d, mask_d, PAGE: tl.constexpr, EVEN_D: tl.constexpr, OFFS_I32: tl.constexpr):
    """K and V [BLOCK_N, BLOCK_D] of tokens `tok` in blocks `blk`, all of which the caller knows to be in range.

    Only head_dim is masked, and only when BLOCK_D pads it (EVEN_D false).
    """
    k_ptrs = k_cache + kv_offsets(blk, tok, kv_head, stride_kb, stride_kt, stride_kh, offs_d, PAGE, OFFS_I32)
    v_ptrs = v_cache + kv_offsets(blk, tok, kv_head, stride_vb, stride_vt, stride_vh, offs_d, PAGE, OFFS_I32)
    if EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    return k, v


@triton.jit
def load_kv_tile(k_cache, v_cache, table_ptr, n0, end, kv_head, stride_kb, stride_kt, stride_kh, stride_vb,
                 stride_vt, stride_vh, offs_n, offs_d, mask_d, PAGE: tl.constexpr, OFFS_I32: tl.constexpr):
    """K and V [BLOCK_N, BLOCK_D] of tokens [n0, n0 + BLOCK_N) through the block table (zeros past `end`)."""
    tok = n0 + offs_n
    valid = tok < end
    blk = tl.load(table_ptr + tok // PAGE, mask=valid, other=0)
    kv_mask = valid[:, None] & mask_d[None, :]
    k = tl.load(k_cache + kv_offsets(blk, tok, kv_head, stride_kb, stride_kt, stride_kh, offs_d, PAGE, OFFS_I32),
                mask=kv_mask, other=0.0)
    v = tl.load(v_cache + kv_offsets(blk, tok, kv_head, stride_vb, stride_vt, stride_vh, offs_d, PAGE, OFFS_I32),
                mask=kv_mask, other=0.0)
    return k, v, valid


@triton.jit
def online_softmax_tile(q, k, v, valid, acc, m_i, l_i, qk_scale_log2, DOT_PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr, MASKED: tl.constexpr):
    """Fold one K/V tile ([BLOCK_N, BLOCK_D]) into the running (acc, m, l) of the rows.

    With MASKED, only tokens where `valid` count; without, `valid` is ignored and every token does. The
    scale is folded into the exponent (one FMA a score instead of a multiply and a subtract): the max
    of the raw scores, scaled once per row, is the max of the scaled ones since the scale is positive.
    """
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [ROWS, BLOCK_N] raw scores
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale_log2)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def finish_partial(acc, m_i, l_i):
    """Normalised output and natural-log LSE of one split; an empty split gives (0, -inf)."""
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    return out, lse


@triton.jit
def split_range(ctx_len, split, NUM_SPLITS, BLOCK_N: tl.constexpr):
    """Token range [start, end) of one split: equal chunks rounded up to whole tiles."""
    chunk = tl.cdiv(tl.cdiv(ctx_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, ctx_len)
    return start, end


@triton.jit
def _paged_decode_split_kernel(
    q_ptr,
    k_cache,
    v_cache,
    block_tables,
    context_lens,
    out_ptr,  # [B, Hq, splits, D] partials, or the final [B, Hq, 1, D] when there is one split
    lse_ptr,  # [B, Hq, splits]
    prev_out,  # [B, Hq, num_prev, D] partials over other tokens, folded in when MERGE_PREV
    prev_lse,  # [B, Hq, num_prev]
    qk_scale_log2,
    num_splits,
    split_offset,
    num_prev,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_plb,
    stride_plh,
    stride_pls,
    HEAD_DIM: tl.constexpr,
    GQ: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    MERGE_PREV: tl.constexpr,
    PREV_P2: tl.constexpr,
    WAIT_PREV: tl.constexpr,
    OFFS_I32: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(context_lens + seq)
    start, end = split_range(ctx_len, split, num_splits, BLOCK_N)

    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_r = offs_r < GQ
    heads = kv_head * GQ + offs_r
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_r[:, None] & mask_d[None, :],
        other=0.0,
    )  # [ROWS, BLOCK_D]; rows past GQ are zero padding for tl.dot
    if UPCAST:
        q = q.to(tl.float32)
    acc, m_i, l_i = attend_token_range(
        q, k_cache, v_cache, block_tables + seq.to(tl.int64) * stride_bt, start, end, kv_head,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, qk_scale_log2, offs_d, mask_d,
        ROWS, BLOCK_N, PAGE, BLOCK_D, HEAD_DIM, DOT_PRECISION, UPCAST, OFFS_I32,
    )
    out, lse = finish_partial(acc, m_i, l_i)
    if MERGE_PREV:
        # Fold in partials over other tokens (the shared prefix) here, saving a separate merge pass. All
        # of them load at once: a loop of dependent load-then-merge steps cost ~1 us of latency each.
        if WAIT_PREV:
            # Launched as a programmatic dependent of the kernel that writes the partials: everything
            # above ran while that kernel was still finishing; its writes are visible after this wait.
            gdc_wait()
        offs_p = tl.arange(0, PREV_P2)
        mask_p = mask_r[:, None] & (offs_p[None, :] < num_prev)  # [ROWS, PREV_P2]
        lse_p = tl.load(
            prev_lse + seq * stride_plb + heads[:, None] * stride_plh + offs_p[None, :] * stride_pls,
            mask=mask_p,
            other=float("-inf"),
        )  # [ROWS, PREV_P2]
        out_p = tl.load(
            prev_out + seq * stride_pb + heads[:, None, None] * stride_ph + offs_p[None, :, None] * stride_ps
            + offs_d[None, None, :],
            mask=mask_p[:, :, None] & mask_d[None, None, :],
            other=0.0,
        ).to(tl.float32)  # [ROWS, PREV_P2, BLOCK_D]
        m = tl.maximum(lse, tl.max(lse_p, 1))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w_own = tl.exp(lse - m_safe)  # [ROWS]; empty partials weigh 0
        w_p = tl.exp(lse_p - m_safe[:, None])  # [ROWS, PREV_P2]
        total = w_own + tl.sum(w_p, 1)
        total_safe = tl.where(total > 0, total, 1.0)
        out = (out * w_own[:, None] + tl.sum(out_p * w_p[:, :, None], 1)) / total_safe[:, None]
        lse = tl.where(total > 0, m_safe + tl.log(total_safe), float("-inf"))
    s_idx = split_offset + split
    tl.store(
        out_ptr + seq * stride_ob + heads[:, None] * stride_oh + s_idx * stride_os + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_r[:, None] & mask_d[None, :],
    )
    tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + s_idx * stride_ls, lse, mask=mask_r)


@triton.jit
def _merge_splits_kernel(
    part_out,  # [B, Hq, S, D] fp32
    part_lse,  # [B, Hq, S] fp32
    out_ptr,  # [B, Hq, D]
    lse_ptr,  # [B, Hq] fp32
    num_splits,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_ob,
    stride_oh,
    stride_fb,
    stride_fh,
    HEAD_DIM: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(part_lse + b * stride_lb + h * stride_lh + offs_s * stride_ls, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)  # [SPLITS_P2]; empty splits weigh 0
    total = tl.sum(w, 0)
    parts = tl.load(
        part_out + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )  # [SPLITS_P2, BLOCK_D]
    merged = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, merged.to(out_ptr.dtype.element_ty), mask=mask_d)
    total_safe = tl.where(total > 0, total, 1.0)
    tl.store(lse_ptr + b * stride_fb + h * stride_fh, tl.where(total > 0, m_safe + tl.log(total_safe), float("-inf")))


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor, where: str) -> None:
    """A layer's K and V caches: the same [num_blocks, block_size, num_kv_heads, head_dim] shape."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{where}: k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)}: expected both "
            "[num_blocks, block_size, num_kv_heads, head_dim]"
        )


def check_paged_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, where: str
) -> tuple[int, int, int, int, int]:
    """Validate the query and cache tensors; return (B, Hq, Hkv, D, block_size)."""
    if q.dim() != 3:
        raise ValueError(f"{where}: q has shape {tuple(q.shape)}: expected [B, num_q_heads, head_dim]")
    check_cache_pair(k_cache, v_cache, where)
    B, Hq, D = q.shape
    _, page, Hkv, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"{where}: cache head_dim {Dk} != query head_dim {D}")
    if Hq % Hkv != 0:
        raise ValueError(f"{where}: num_q_heads {Hq} is not a multiple of num_kv_heads {Hkv}")
    if q.dtype not in _SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"{where}: dtypes q={q.dtype}, k_cache={k_cache.dtype}, v_cache={v_cache.dtype}: expected one "
            "of float32/float16/bfloat16, the same for all three"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError(f"{where}: head_dim must be the contiguous (last, stride 1) dimension of q and the caches")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError(f"{where}: q on {q.device}, caches on {k_cache.device}/{v_cache.device}: expected one device")
    if not triton_attention_available(q.device):
        raise ValueError(f"{where}: tensors on {q.device}: Triton kernels need CUDA (or TRITON_INTERPRET=1)")
    return B, Hq, Hkv, D, page


def check_table(table: torch.Tensor, lens: torch.Tensor, rows: int, name: str, where: str) -> None:
    """Validate one block table ([rows, width] int32) and its lengths ([rows] int32)."""
    if table.dim() != 2 or table.shape[0] != rows or table.dtype != torch.int32:
        raise ValueError(
            f"{where}: {name} block table has shape {tuple(table.shape)} dtype {table.dtype}: "
            f"expected int32 [{rows}, max_blocks]"
        )
    if lens.shape != (rows,) or lens.dtype != torch.int32:
        raise ValueError(
            f"{where}: {name} lengths have shape {tuple(lens.shape)} dtype {lens.dtype}: expected int32 [{rows}]"
        )
    if table.stride(1) != 1:
        raise ValueError(f"{where}: {name} block table rows must be contiguous")


def launch_paged_splits(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    out: torch.Tensor,
    lse: torch.Tensor,
    split_offset: int = 0,
    block_n: int = DEFAULT_BLOCK_N,
    merge_from: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    overlap_prev: bool = False,
    maxnreg: int | None = None,
) -> None:
    """Write each split's partial (out [B, Hq, S, D], lse [B, Hq, S]) at split index split_offset + s.

    merge_from=(prev_out [B, Hq, P, D], prev_lse [B, Hq, P]): partials over other tokens of the same
    sequences, merged into the result before it is written (only with num_splits == 1).
    overlap_prev: the kernel that writes merge_from's partials was launched just before on this stream
    and lets dependents start early (`gdc_launch_dependents`); this kernel is then launched as its
    programmatic dependent (Hopper and later) and attends its own tokens while that one finishes,
    waiting for it only before reading the partials. Ignored without merge_from and under the interpreter.
    num_warps / num_stages / maxnreg (a cap on registers per thread, for more programs per SM): Triton
    launch options (tuning knobs for bench/attention.py's sweeps).
    """
    B, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    if B == 0:
        return
    if merge_from is not None and num_splits != 1:
        raise ValueError(f"launch_paged_splits: merge_from needs num_splits == 1, got {num_splits}")
    prev_out, prev_lse = merge_from if merge_from is not None else (out, lse)
    num_prev = prev_out.shape[2] if merge_from is not None else 0
    overlap = overlap_prev and merge_from is not None and programmatic_launch_available(q.device)
    gq = Hq // Hkv
    _paged_decode_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, lse, prev_out, prev_lse,
        scale * LOG2E, num_splits, split_offset, num_prev,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        prev_out.stride(0), prev_out.stride(1), prev_out.stride(2),
        prev_lse.stride(0), prev_lse.stride(1), prev_lse.stride(2),
        HEAD_DIM=D, GQ=gq, ROWS=max(16, triton.next_power_of_2(gq)), BLOCK_N=block_n, PAGE=page,
        BLOCK_D=max(16, triton.next_power_of_2(D)), DOT_PRECISION=dot_precision(q.dtype),
        UPCAST=upcast_dots(q.dtype), MERGE_PREV=merge_from is not None, PREV_P2=max(2, triton.next_power_of_2(num_prev)),
        WAIT_PREV=overlap, OFFS_I32=offsets_fit_int32(k_cache, v_cache), num_warps=num_warps, num_stages=num_stages,
        **launch_options(overlap, maxnreg),
    )


def merge_attention_partials(
    part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """Merge S partial attentions of each (sequence, head) by log-sum-exp into out [B, Hq, D], lse [B, Hq].

    Each partial covers a disjoint token set: out = sum_s exp(lse_s - lse) * out_s, lse = log sum_s exp(lse_s).
    A row whose partials are all empty (lse -inf) gets out 0 and lse -inf.
    """
    B, Hq, S, D = part_out.shape
    if B == 0:
        return
    _merge_splits_kernel[(B, Hq)](
        part_out, part_lse, out, lse, S,
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        HEAD_DIM=D, SPLITS_P2=max(2, triton.next_power_of_2(S)), BLOCK_D=max(16, triton.next_power_of_2(D)),
        num_warps=4,
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    return_lse: bool = False,
    block_n: int = DEFAULT_BLOCK_N,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query token per sequence over its paged K/V.

    q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables int32 [B, max_blocks];
    context_lens int32 [B] (tokens to attend, the new token's K/V already written). Returns out [B, Hq, D]
    in q's dtype, and with return_lse also the natural-log LSE of the scaled scores, fp32 [B, Hq].
    num_splits=None picks it from B * Hkv against the device's SM count (see choose_num_splits).
    """
    where = "paged_decode_attention"
    B, Hq, Hkv, D, page = check_paged_inputs(q, k_cache, v_cache, where)
    check_table(block_tables, context_lens, B, "sequence", where)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"{where}: block_n = {block_n}: expected a power of two >= 16")
    max_context = block_tables.shape[1] * page
    if num_splits is None:
        dev_index = q.device.index if q.device.type == "cuda" else None
        num_sms = sm_count(dev_index) if q.device.type == "cuda" else DEFAULT_SM_COUNT
        num_splits = choose_num_splits(max(1, B * Hkv), max_context, num_sms)
    if num_splits < 1:
        raise ValueError(f"{where}: num_splits = {num_splits}: expected >= 1")
    out = torch.empty_like(q)  # [B, Hq, D]
    lse = torch.empty(B, Hq, device=q.device, dtype=torch.float32)  # [B, Hq]
    if num_splits == 1:
        # One split is already the whole answer: write it straight into the outputs, no merge pass.
        launch_paged_splits(
            q, k_cache, v_cache, block_tables, context_lens, scale, 1, out.unsqueeze(2), lse.unsqueeze(2), 0, block_n
        )
    else:
        part_out = torch.empty(B, Hq, num_splits, D, device=q.device, dtype=torch.float32)  # [B, Hq, S, D]
        part_lse = torch.empty(B, Hq, num_splits, device=q.device, dtype=torch.float32)  # [B, Hq, S]
        launch_paged_splits(
            q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, part_out, part_lse, 0, block_n
        )
        merge_attention_partials(part_out, part_lse, out, lse)
    return (out, lse) if return_lse else out


def default_scale(head_dim: int) -> float:
    """The usual softmax scale 1/sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim)
