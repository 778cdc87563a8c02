"""Hopper fast path of the shared-prefix pass: producer warps stream the prompt's K/V, consumer warpgroups score it.

The Triton prefix kernel (`shared_prefix._shared_prefix_kernel`) keeps one K/V tile in flight per program,
staged through registers, and each warp waits on every load in turn: at prompt 4k, G 16 on an H200 it takes
~22 us for the pass (~1.6 TB/s). This kernel, written in Gluon (Triton's explicit-layout dialect), gives
each role its own warps, as FlashAttention-3 does:

- a producer partition (4 warps) gathers each stage of the group's prompt pages through the block table
  with `cp.async` straight into a ring of shared-memory stages (three of 32 KB), and each of its threads
  arrives on the stage's mbarrier when its copies land;
- one consumer warpgroup per 64 rows of the group's (samples x query heads) waits for a stage, scores it
  with a wgmma (Q from shared memory), runs the online softmax, accumulates P V with a second wgmma
  (P from registers), and frees the stage on a second mbarrier.

So three stages are in flight per program whatever the softmax is doing, and no warp stages K/V through
its registers: the pass alone takes 14.5 us at prompt 4k, G 16. Inputs, grid and partial outputs are the
Triton kernel's (one program per group row tile, KV head and split), so `shared_prefix_decode_attention`
launches either and the suffix pass is unchanged. It needs an sm_90 GPU, 16-bit caches and head_dim 64 or
128 (`hopper_prefix_supported`); there is no CPU interpreter for Gluon, so its tests run on the GPU and the
Triton kernel, checked on the CPU, is its reference.
"""

from __future__ import annotations

import torch

try:  # Gluon ships with Triton 3.4+; without it only the Triton prefix kernel exists.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
    )

    from triton.language.extra.cuda import gdc_launch_dependents

    GLUON_IMPORTED = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    GLUON_IMPORTED = False

from async_grpo.kv.triton_paged import interpreting, offsets_fit_int32, split_range

# Stages of the K/V ring, and prompt tokens per stage: 32 KB of K/V a stage at head_dim 64 (128 tokens), as at
# head_dim 128 (64 tokens), so three stages and Q stay within shared memory. On an H200 at prompt 4k, G 16 the
# prefix pass alone took 14.3 us with 128-token stages against 15.9 with 64-token ones (3 stages; 2 stages:
# 14.4 and 16.2).
GLUON_STAGES = 3
STAGE_KV_BYTES = 32 * 1024
# Warps of the producer partition and its registers (it holds addresses only); each consumer warpgroup's registers
# (the one in the default partition gets what the launch's cap leaves: 3 x 128 - 160 - 56 = 168).
PRODUCER_WARPS = 4
PRODUCER_REGS = 56
CONSUMER_REGS = 160
# The launch's registers per thread: 12 warps x 128 leave a quarter of the register file for programs of the
# suffix pass (launched as this kernel's programmatic dependent) beside each prefix program: four of one warp
# (`shared_prefix.suffix_launch_shape`). Prompt 4k, G 16, with 4-warp suffix programs (one beside): 27.1 us for
# the whole step against 29.3 without the cap (the prefix pass alone 14.5 against 14.2).
GLUON_MAXNREG = 128
# Programs per SM: one (12 warps and ~130 KB of shared memory), so the splits fill one wave of SMs.
GLUON_PROGRAMS_PER_SM = 1


def gluon_block_n(head_dim: int) -> int:
    """Prompt tokens per stage of the ring for `head_dim` (16-bit K and V, STAGE_KV_BYTES a stage)."""
    return STAGE_KV_BYTES // (2 * 2 * head_dim)


def hopper_prefix_supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the Gluon prefix kernel can run these inputs: compiled on an sm_90 GPU, 16-bit, head_dim 64 or 128."""
    if not GLUON_IMPORTED or interpreting() or q.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or k_cache.dtype != q.dtype or q.shape[-1] not in (64, 128):
        return False
    # Each token's row of a head is copied in 16-byte pieces: rows contiguous and 16-byte aligned.
    return all(
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1])
        for t in (k_cache, v_cache)
    )


def launch_hopper_prefix(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    group_order: torch.Tensor,
    group_starts: torch.Tensor,
    group_counts: torch.Tensor,
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    qk_scale_log2: float,
    num_splits: int,
    row_tiles: int,
    rows: int,
    page: int,
    *,
    launch_dependents: bool = False,
    stages: int = GLUON_STAGES,
    block_n: int | None = None,
    maxnreg: int | None = GLUON_MAXNREG,
    producer_regs: int = PRODUCER_REGS,
    consumer_regs: int = CONSUMER_REGS,
) -> None:
    """The prefix pass on the Gluon kernel: partials of (group row tile, KV head, split) into part_out / part_lse.

    The arguments are `_shared_prefix_kernel`'s; `rows` (64 or 128) is the group row tile, one consumer
    warpgroup per 64 rows. The caller checked `hopper_prefix_supported`. The keyword options are tuning
    knobs (block_n None: `gluon_block_n`); the defaults are the fastest measured.
    """
    if rows not in (64, 128):
        raise ValueError(f"launch_hopper_prefix: rows = {rows}: expected 64 or 128")
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k_cache.shape[2]
    block_n = gluon_block_n(D) if block_n is None else block_n
    num_groups = prefix_tables.shape[0]
    _hopper_prefix_kernel[(num_groups * row_tiles, Hkv, num_splits)](
        q, k_cache, v_cache, prefix_tables, prefix_lens, group_order, group_starts, group_counts, part_out, part_lse,
        qk_scale_log2, num_splits, row_tiles,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        prefix_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        HEAD_DIM=D, GQ=Hq // Hkv, ROWS=rows, BLOCK_N=block_n, PAGE=page, STAGES=stages,
        LAUNCH_DEPENDENTS=launch_dependents, OFFS_I32=offsets_fit_int32(k_cache, v_cache),
        PRODUCER_WARPS_=PRODUCER_WARPS, PRODUCER_REGS_=producer_regs, CONSUMER_REGS=consumer_regs,
        num_warps=4, maxnreg=maxnreg,
    )


if GLUON_IMPORTED:

    @gluon.constexpr_function
    def _tile_layout(cols, num_warps):
        """Blocked layout of a [rows, cols] 16-bit tile: 16-byte vectors, a row's vectors across adjacent threads."""
        per_row = min(32, cols // 8)
        return gl.BlockedLayout([1, 8], [32 // per_row, per_row], [num_warps, 1], [1, 0])

    # The Triton kernels' split rule, compiled as Gluon: both prefix kernels must cut a prompt the same way.
    _split_range = gluon.jit(split_range.fn)

    @gluon.jit
    def _produce(k_cache, v_cache, table, start, end, kv_head, stride_kb, stride_kt, stride_kh, stride_vb,
                 stride_vt, stride_vh, k_bufs, v_bufs, full_bars, empty_bars, HEAD_DIM: gl.constexpr,
                 BLOCK_N: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr, OFFS_I32: gl.constexpr):
        """Producer partition: tile t of [start, end) into stage t % STAGES once its consumers freed it."""
        layout: gl.constexpr = _tile_layout(HEAD_DIM, gl.num_warps())
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
        last = gl.maximum(end - 1, 0)
        n_tiles = gl.cdiv(gl.maximum(end - start, 0), BLOCK_N)
        # Block ids are read a tile ahead, so the table's round trip is off the path from a free stage to its
        # copies. Tokens past the range repeat the last one: in range without masks; the consumers mask scores.
        tok = gl.minimum(start + offs_n, last)
        blk = gl.load(table + tok // PAGE)
        for t in range(n_tiles):
            stage = t % STAGES
            tok_next = gl.minimum(start + (t + 1) * BLOCK_N + offs_n, last)
            blk_next = gl.load(table + tok_next // PAGE)
            slot = tok % PAGE
            if OFFS_I32:
                k_row = blk * stride_kb + slot * stride_kt + kv_head * stride_kh
                v_row = blk * stride_vb + slot * stride_vt + kv_head * stride_vh
            else:
                k_row = blk.to(gl.int64) * stride_kb + slot * stride_kt + kv_head * stride_kh
                v_row = blk.to(gl.int64) * stride_vb + slot * stride_vt + kv_head * stride_vh
            # Rows start on 16-byte boundaries (`hopper_prefix_supported` checks the strides): 16-byte copies.
            k_row = gl.multiple_of(k_row, 8)
            v_row = gl.multiple_of(v_row, 8)
            # A fresh barrier counts as having completed the phase before its first: the first round passes.
            mbarrier.wait(empty_bars.index(stage), ((t // STAGES) & 1) ^ 1)
            async_copy.async_copy_global_to_shared(k_bufs.index(stage), k_cache + (k_row[:, None] + offs_d[None, :]))
            async_copy.async_copy_global_to_shared(v_bufs.index(stage), v_cache + (v_row[:, None] + offs_d[None, :]))
            # Each producer thread arrives once its own copies have landed.
            async_copy.mbarrier_arrive(full_bars.index(stage), increment_count=False)
            tok, blk = tok_next, blk_next

    @gluon.jit
    def _consume(q_ptr, out_ptr, lse_ptr, group_order, first, count, row0, kv_head, split, start, end,
                 qk_scale_log2, stride_qb, stride_qh, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
                 k_bufs, v_bufs, full_bars, empty_bars, q_smem, HEAD_DIM: gl.constexpr, GQ: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """Consumer warpgroup: rows [row0, row0 + 64) of the group tile over every stage, then their partials."""
        ROWS: gl.constexpr = 64
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        io_layout: gl.constexpr = _tile_layout(HEAD_DIM, 4)
        dtype: gl.constexpr = k_bufs.dtype

        rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, io_layout))
        sample = rows // GQ
        heads = kv_head * GQ + rows % GQ
        row_live = sample < count
        seq = gl.load(group_order + first + sample, mask=row_live, other=0).to(gl.int64)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io_layout))
        row_mask = row_live[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = gl.load(q_ptr + seq[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=row_mask,
                    other=0.0)
        # Q is the score wgmma's A operand from shared memory: as a register operand reused across the loop, it
        # was found overwritten after the first tile (sm_90, Triton 3.6), so it is staged once here instead.
        q_smem.store(q)
        fence_async_shared()
        gl.thread_barrier()

        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        n_tiles = gl.cdiv(gl.maximum(end - start, 0), BLOCK_N)
        for t in range(n_tiles):
            stage = t % STAGES
            mbarrier.wait(full_bars.index(stage), (t // STAGES) & 1)
            # cp.async wrote the stage through the generic proxy; wgmma reads it through the async one.
            fence_async_shared()
            k = k_bufs.index(stage)
            v = v_bufs.index(stage)
            s = warpgroup_mma(q_smem, k.permute((1, 0)), s_zero, use_acc=False)  # [64, BLOCK_N] raw scores
            n0 = start + t * BLOCK_N
            if n0 + BLOCK_N > end:
                s = gl.where((n0 + offs_n < end)[None, :], s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale_log2)
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s * qk_scale_log2 - m_new[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            p16 = gl.convert_layout(p.to(dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            acc = warpgroup_mma(p16, v, acc)
            # Both wgmmas have completed in every warp of this group before the stage is handed back.
            gl.thread_barrier()
            mbarrier.arrive(empty_bars.index(stage), count=1)

        has = l_i > 0
        l_safe = gl.where(has, l_i, 1.0)
        out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
        lse = gl.where(has, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        out = gl.convert_layout(out.to(out_ptr.dtype.element_ty), io_layout)
        gl.store(out_ptr + seq[:, None] * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
                 out, mask=row_mask)
        lse = gl.convert_layout(lse, gl.SliceLayout(1, io_layout))
        gl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=row_live)

    @gluon.jit
    def _hopper_prefix_kernel(
        q_ptr, k_cache, v_cache, prefix_tables, prefix_lens, group_order, group_starts, group_counts, out_ptr, lse_ptr,
        qk_scale_log2, num_splits, row_tiles,
        stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_pt,
        stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
        HEAD_DIM: gl.constexpr, GQ: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, PAGE: gl.constexpr,
        STAGES: gl.constexpr, LAUNCH_DEPENDENTS: gl.constexpr, OFFS_I32: gl.constexpr,
        PRODUCER_WARPS_: gl.constexpr, PRODUCER_REGS_: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    ):
        if LAUNCH_DEPENDENTS:
            # Lets the suffix kernel (the programmatic dependent) start on the room this grid leaves.
            gdc_launch_dependents()
        group = gl.program_id(0) // row_tiles
        tile = gl.program_id(0) % row_tiles
        kv_head = gl.program_id(1)
        split = gl.program_id(2)
        count = gl.load(group_counts + group)
        first = gl.load(group_starts + group)
        plen = gl.load(prefix_lens + group)
        start, end = _split_range(plen, split, num_splits, BLOCK_N)
        # A row tile past the group's live rows has nothing to attend: an empty range, and no rows to store.
        end = gl.where(tile * ROWS < count * GQ, end, start)
        table = prefix_tables + group.to(gl.int64) * stride_pt

        layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], k_cache.dtype.element_ty)
        k_bufs = gl.allocate_shared_memory(k_cache.dtype.element_ty, [STAGES, BLOCK_N, HEAD_DIM], layout)
        v_bufs = gl.allocate_shared_memory(v_cache.dtype.element_ty, [STAGES, BLOCK_N, HEAD_DIM], layout)
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, HEAD_DIM], q_ptr.dtype.element_ty)
        q_bufs = gl.allocate_shared_memory(q_ptr.dtype.element_ty, [ROWS // 64, 64, HEAD_DIM], q_layout)
        full_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(full_bars.index(i), count=PRODUCER_WARPS_ * 32)
            mbarrier.init(empty_bars.index(i), count=ROWS // 64)

        row0 = tile * ROWS
        # The partitions' arguments are written inline: a tuple bound to a name first turns its constexprs into
        # tensors, and the partitions need them as constexprs.
        if ROWS == 128:
            gl.warp_specialize([
                (_consume, (q_ptr, out_ptr, lse_ptr, group_order, first, count, row0, kv_head, split, start, end,
                            qk_scale_log2, stride_qb, stride_qh, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                            stride_ls, k_bufs, v_bufs, full_bars, empty_bars, q_bufs.index(0), HEAD_DIM, GQ, BLOCK_N,
                            STAGES)),
                (_consume, (q_ptr, out_ptr, lse_ptr, group_order, first, count, row0 + 64, kv_head, split, start,
                            end, qk_scale_log2, stride_qb, stride_qh, stride_ob, stride_oh, stride_os, stride_lb,
                            stride_lh, stride_ls, k_bufs, v_bufs, full_bars, empty_bars, q_bufs.index(1), HEAD_DIM, GQ,
                            BLOCK_N, STAGES)),
                (_produce, (k_cache, v_cache, table, start, end, kv_head, stride_kb, stride_kt, stride_kh, stride_vb,
                            stride_vt, stride_vh, k_bufs, v_bufs, full_bars, empty_bars, HEAD_DIM, BLOCK_N, PAGE,
                            STAGES, OFFS_I32)),
            ], [4, PRODUCER_WARPS_], [CONSUMER_REGS, PRODUCER_REGS_])
        else:
            gl.warp_specialize([
                (_consume, (q_ptr, out_ptr, lse_ptr, group_order, first, count, row0, kv_head, split, start, end,
                            qk_scale_log2, stride_qb, stride_qh, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                            stride_ls, k_bufs, v_bufs, full_bars, empty_bars, q_bufs.index(0), HEAD_DIM, GQ, BLOCK_N,
                            STAGES)),
                (_produce, (k_cache, v_cache, table, start, end, kv_head, stride_kb, stride_kt, stride_kh, stride_vb,
                            stride_vt, stride_vh, k_bufs, v_bufs, full_bars, empty_bars, HEAD_DIM, BLOCK_N, PAGE,
                            STAGES, OFFS_I32)),
            ], [PRODUCER_WARPS_], [PRODUCER_REGS_])
