"""Shared-prefix ("cascade") decode attention: the G samples of a prompt read its KV once.

With prefix sharing, the live samples of one GRPO group point at the same full prompt blocks; only
their last partial prompt block (copied on fork) and their completion blocks are their own. The plain
paged kernel would load the shared prompt blocks once per sample. This module splits attention over
the two disjoint token sets and merges them exactly:

1. prefix kernel, one program per (group, row tile, KV head, split): the rows are
   (live samples of the group) x (query heads of the KV head), so each prompt K/V tile is loaded once
   and scored by one `[rows, D] x [D, BLOCK_N]` tensor-core dot for all of them;
2. the plain paged kernel over each sample's own blocks (tail + completion), writing its partials
   into the same buffer;
3. an exact log-sum-exp merge of all partials: done by the suffix kernel itself when each sample's
   own tokens are one split (the usual case), else by `merge_attention_partials`.

In the usual case the suffix kernel is launched as the prefix kernel's programmatic dependent (Hopper
and later): its programs start as soon as prefix programs leave room, attend their own tokens, and
wait for the whole prefix kernel (`gdc_wait`) only before reading its partials, so the second launch's
start-up and the prefix kernel's last programs overlap instead of adding up. Beside the Gluon prefix kernel
the suffix programs are small (`suffix_launch_shape`) so that nearly all of them fit on the room it leaves
and attend their tokens while the prefix pass runs.

The engine passes only live sequences, so a group may have any number of live samples from 1 to G
(or none, then its programs exit at once); `seq_group` says which group each live sequence is in,
and a `GroupLayout` built from it once per step serves every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from async_grpo.kv.gluon_prefix import (
    GLUON_PROGRAMS_PER_SM,
    launch_hopper_prefix,
    hopper_prefix_supported,
)
from async_grpo.kv.triton_paged import (
    DEFAULT_BLOCK_N,
    DEFAULT_SM_COUNT,
    LOG2E,
    MAX_SPLITS,
    MIN_TOKENS_PER_SPLIT,
    dot_precision,
    upcast_dots,
    attend_token_range,
    check_paged_inputs,
    check_table,
    choose_num_splits,
    finish_partial,
    launch_options,
    launch_paged_splits,
    load_kv_pages,
    load_kv_tile,
    merge_attention_partials,
    offsets_fit_int32,
    online_softmax_tile,
    programmatic_launch_available,
    sm_count,
    split_range,
    whole_tiles_end,
)

# 128 rows hold G=16 samples x 7-8 query heads per KV head (Qwen2-0.5B: 14 q / 2 kv heads) in one tile.
MAX_TILE_ROWS = 128
# Smaller groups still get 64-row tiles, one warpgroup's tensor-core tile: on an H200 at prompt 4k, G 4 (28 rows)
# took 50.2 us in 64-row tiles against 75.7 in 32-row ones (1k: 25.6 against 33.3), and G 2 (14 rows) 92.6
# against 122.3 in 16-row ones (1k: 35.9 against 43.7): the padding rows cost less than the small tiles'
# registers and dots.
MIN_TILE_ROWS = 64
# The prefix pass's kernels: the warp-specialized Gluon one (Hopper) or the Triton one; "auto" picks.
PREFIX_KERNELS = ("auto", "gluon", "triton")
# "auto" takes the Gluon kernel from prompts this long: on an H200 it won at prompt 4k (G 16: 23.8 against
# 30.5 us for the whole step, with the small suffix programs beside it; G 8: 30.2 against 35.4) and lost a
# little at 1k (G 16, before those: 17.1 against 16.5).
GLUON_MIN_PREFIX_TOKENS = 2048
# Prompt tokens per tile of the prefix kernel: on an H200 at prompt 4k, G 16, a grid over tiles (64, 128),
# splits (4-32), row tiles (64, 128), warps (4, 8) and prefetching put 64 / 8 splits / 128 rows / prefetching
# first: 38.9 us, against 41.3 without prefetching.
PREFIX_BLOCK_N = 64
# Stages of the suffix pass's loads: with one, its programs take 22 KB of shared memory instead of 39 KB and
# more of them share an SM with the prefix programs (prompt 4k, G 16: 35.6 against 37.0 us; 1k: 21.0 against 22.1).
SUFFIX_NUM_STAGES = 1


def prefix_launch_shape(tile_rows: int) -> tuple[int, int | None]:
    """(warps, register cap per thread) of a prefix program for `tile_rows`-row tiles.

    A 128-row program holds a [128, 64] fp32 accumulator and score tile: with 4 warps that is 239
    registers a thread, two programs (8 warps) per SM, and the warps mostly wait on each other's
    dependency chains. 8 warps capped at 120 registers (2 spills) keep two programs, now 16 warps, per
    SM (H200, prompt 4k G 16: 35.0 against 35.6 us; 1k G 16: 19.7 against 21.0). Smaller tiles already
    fit three programs of 4 warps; 8 warps made them slower (4k G 8: 53.8 against 39.9 us).
    """
    return (8, 120) if tile_rows >= 128 else (4, None)


def suffix_launch_shape(gluon_rows: int | None, head_dim: int = 64) -> tuple[int, int, int, int | None]:
    """(warps, tokens per tile, pipeline stages, register cap) of the suffix pass's programs.

    `gluon_rows` is the row tile of the Gluon prefix kernel the suffix pass runs beside (launched as its
    programmatic dependent), None without one. A suffix program attends its sample's own tokens, then
    waits for the whole prefix pass before merging, holding its room on the SM. Beside a Gluon program
    (12 warps x 128 registers for 128-row tiles, 8 x 128 for 64-row ones) that room is what its register
    cap leaves, so the programs are made small enough that four fit in it: nearly every sample's own
    tokens are then attended while the prefix pass runs, and only the merge is left for after it. On an
    H200 at prompt 4k (same runs): G 16, 1 warp x 64-token tiles 23.6 us, 1 x 32 25.1, 2 x 32 30.9,
    against 27.1 with the 4-warp programs (at most one beside, the rest start after the prefix pass); G 8,
    2 warps x 32-token tiles 29.7 us, 1 x 32 30.3, 1 x 64 32.1, against 33.4. Two stages let the compiler
    overlap a tile's loads with the last one's maths (G 16: 25.2 against 31.6 with one). Without the Gluon
    kernel there is no room beside the prefix programs, and the one-stage 4-warp programs (22 KB of shared
    memory each) were the fastest after them. The tiles beside it hold the same bytes at any head_dim
    (half the tokens at 128), so they fit the same registers; head_dim 128 and prompts of 2k are untimed.
    """
    if gluon_rows == 128:
        return 1, max(16, 64 * 64 // head_dim), 2, 128
    if gluon_rows == 64:
        return 2, max(16, 32 * 64 // head_dim), 2, 128
    return 4, DEFAULT_BLOCK_N, SUFFIX_NUM_STAGES, None


def use_hopper_prefix(
    prefix_kernel: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, max_prefix_tokens: int
) -> bool:
    """Whether the prefix pass runs the Gluon kernel: `prefix_kernel` is one of PREFIX_KERNELS.

    "auto" takes it where `hopper_prefix_supported` and the prompts may reach GLUON_MIN_PREFIX_TOKENS
    (`max_prefix_tokens`, from the table's width: no device sync); "gluon" where it cannot run is a ValueError.
    """
    if prefix_kernel not in PREFIX_KERNELS:
        raise ValueError(f"prefix_kernel = {prefix_kernel!r}: expected one of {PREFIX_KERNELS}")
    if prefix_kernel == "triton":
        return False
    supported = hopper_prefix_supported(q, k_cache, v_cache)
    if prefix_kernel == "gluon":
        if not supported:
            raise ValueError(
                "prefix_kernel = 'gluon' needs a compiled sm_90 GPU, a 16-bit cache with 16-byte aligned rows "
                "and head_dim 64 or 128"
            )
        return True
    return supported and max_prefix_tokens >= GLUON_MIN_PREFIX_TOKENS


def prefix_programs_per_sm(tile_rows: int) -> int:
    """How many prefix programs of a row tile fit on one SM at once: their registers are the limit.

    From the compiled kernels' register counts (bf16, prefetching loop, `prefix_launch_shape`, sm_90):
    a 128-row program's accumulator, scores and two K/V tiles in flight fill half the register file
    (8 warps x 120 registers); a 64-row program (4 x 160) fits three. Tiles below MIN_TILE_ROWS, only
    on request: 32 rows take 4 x 199 (two fit), 16 rows 4 x 156 (three).
    """
    if tile_rows >= 128:
        return 2
    return {64: 3, 32: 2}.get(tile_rows, 3)


def choose_prefix_splits(
    programs: int, tile_rows: int, max_prefix_tokens: int, num_sms: int, programs_per_sm: int | None = None
) -> int:
    """Splits of each group's prefix so that all prefix programs run in one wave.

    `programs` is the count without splitting (busy groups x row tiles x KV heads). Unlike the plain
    kernel's `choose_num_splits`, this rounds down: a second, partial wave of these long programs costs
    more than the parallelism it adds (prompt 4k, G 16 on an H200: 8 splits 37.0 us, 9 splits 38.0 us;
    G 8, 64-row tiles: 6 splits 41.3 us, 8 splits 48.8 us). A split still gets at least
    MIN_TOKENS_PER_SPLIT tokens. `programs_per_sm` defaults to the Triton kernel's `prefix_programs_per_sm`.
    """
    if programs < 1:
        raise ValueError(f"programs = {programs}: expected at least 1")
    per_sm = prefix_programs_per_sm(tile_rows) if programs_per_sm is None else programs_per_sm
    by_wave = num_sms * per_sm // programs
    by_length = triton.cdiv(max_prefix_tokens, MIN_TOKENS_PER_SPLIT)
    return max(1, min(by_wave, by_length, MAX_SPLITS))


def prefix_tile_rows(
    rows_needed: int, max_tile_rows: int = MAX_TILE_ROWS, min_tile_rows: int = MIN_TILE_ROWS
) -> int:
    """Rows of one prefix program's tile for groups of `rows_needed` rows (live samples x query heads per KV head).

    A power of two from min_tile_rows up to max_tile_rows (which wins if they disagree).
    """
    return min(max_tile_rows, max(min_tile_rows, triton.next_power_of_2(rows_needed)))


def default_partial_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the prefix pass's normalised partial outputs are kept in between the two kernels.

    A 16-bit model's partials are kept in its own dtype, like the output (the log-sum-exps stay fp32):
    a normalised partial is a convex combination of V rows, so it cannot leave V's range, and its
    rounding is the output's own (max error 9.8e-4 against 4.9e-4 with fp32 partials at prompt 4k,
    bf16). They are half of the step's partial traffic: on an H200 at prompt 4k G 16, 29.7 against
    31.3 us. fp32 inputs, the exactness reference, keep fp32 partials.
    """
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


@triton.jit
def _attend_prefetching(q, k_cache, v_cache, table_ptr, start, end, kv_head, stride_kb, stride_kt, stride_kh,
                        stride_vb, stride_vt, stride_vh, qk_scale_log2, offs_d, mask_d, ROWS: tl.constexpr,
                        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, OFFS_I32: tl.constexpr):
    """`attend_token_range` with loads issued ahead of the maths that uses them.

    With few programs per SM (a 128-row tile holds many registers) nothing else hides memory latency,
    so each iteration issues the next tile's K/V loads before the current tile's maths, from block ids
    read one iteration earlier still: neither the table round trip nor the K/V one is on the loop's
    path (H200, prompt 4k: G 16 33.4 -> 32.6 us, G 8 39.7 -> 38.5). Tokens past `end` are clamped to
    the last one, so the loop's loads are in range without per-token masks; only a last partial tile
    masks its scores.
    """
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    last = tl.maximum(end - 1, 0)
    full_end = whole_tiles_end(start, end, BLOCK_N)
    # The first tile (and the second tile's block ids) are read masked, once a program: the range may
    # be empty or shorter than a tile, and then nothing past it is read.
    k_next, v_next, _ = load_kv_tile(k_cache, v_cache, table_ptr, start, end, kv_head, stride_kb, stride_kt,
                                     stride_kh, stride_vb, stride_vt, stride_vh, offs_n, offs_d, mask_d, PAGE, OFFS_I32)
    tok_next = tl.minimum(start + BLOCK_N + offs_n, last)
    blk_next = tl.load(table_ptr + tok_next // PAGE, mask=start + offs_n < end, other=0)
    for n0 in range(start, full_end, BLOCK_N):
        k, v = k_next, v_next
        k_next, v_next = load_kv_pages(k_cache, v_cache, blk_next, tok_next, kv_head, stride_kb, stride_kt, stride_kh,
                                       stride_vb, stride_vt, stride_vh, offs_d, mask_d, PAGE, HEAD_DIM == BLOCK_D,
                                       OFFS_I32)
        tok_next = tl.minimum(n0 + 2 * BLOCK_N + offs_n, last)
        blk_next = tl.load(table_ptr + tok_next // PAGE)
        acc, m_i, l_i = online_softmax_tile(q, k, v, offs_n, acc, m_i, l_i, qk_scale_log2, DOT_PRECISION, UPCAST,
                                            False)
    if full_end < end:
        acc, m_i, l_i = online_softmax_tile(q, k_next, v_next, full_end + offs_n < end, acc, m_i, l_i, qk_scale_log2,
                                            DOT_PRECISION, UPCAST, True)
    return acc, m_i, l_i


@triton.jit
def _shared_prefix_kernel(
    q_ptr,
    k_cache,
    v_cache,
    prefix_tables,
    prefix_lens,
    group_order,  # [B] live sequence ids sorted by group
    group_starts,  # [Ngroups] first index of each group in group_order
    group_counts,  # [Ngroups] live samples of each group
    out_ptr,  # [B, Hq, S_total, D] partials
    lse_ptr,  # [B, Hq, S_total]
    qk_scale_log2,
    num_splits,
    row_tiles,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_pt,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_ls,
    HEAD_DIM: tl.constexpr,
    GQ: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    PREFETCH: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,
    OFFS_I32: tl.constexpr,
):
    if LAUNCH_DEPENDENTS:
        # The suffix kernel may start on whatever room this grid leaves; it waits for our partials itself.
        gdc_launch_dependents()
    group = tl.program_id(0) // row_tiles
    tile = tl.program_id(0) % row_tiles
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    count = tl.load(group_counts + group)
    if tile * ROWS < count * GQ:
        first = tl.load(group_starts + group)
        rows = tile * ROWS + tl.arange(0, ROWS)
        sample = rows // GQ
        heads = kv_head * GQ + rows % GQ
        row_live = sample < count
        seq = tl.load(group_order + first + sample, mask=row_live, other=0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        row_mask = row_live[:, None] & mask_d[None, :]
        q = tl.load(
            q_ptr + seq[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=row_mask, other=0.0
        )  # [ROWS, BLOCK_D]: (sample, head) rows of this group and KV head
        if UPCAST:
            q = q.to(tl.float32)
        plen = tl.load(prefix_lens + group)
        start, end = split_range(plen, split, num_splits, BLOCK_N)
        table = prefix_tables + group.to(tl.int64) * stride_pt
        if PREFETCH:
            acc, m_i, l_i = _attend_prefetching(
                q, k_cache, v_cache, table, start, end, kv_head, stride_kb, stride_kt, stride_kh, stride_vb,
                stride_vt, stride_vh, qk_scale_log2, offs_d, mask_d, ROWS, BLOCK_N, PAGE, BLOCK_D, HEAD_DIM,
                DOT_PRECISION, UPCAST, OFFS_I32,
            )
        else:
            acc, m_i, l_i = attend_token_range(
                q, k_cache, v_cache, table, start, end, kv_head, stride_kb, stride_kt, stride_kh, stride_vb,
                stride_vt, stride_vh, qk_scale_log2, offs_d, mask_d, ROWS, BLOCK_N, PAGE, BLOCK_D, HEAD_DIM,
                DOT_PRECISION, UPCAST, OFFS_I32,
            )
        out, lse = finish_partial(acc, m_i, l_i)
        tl.store(
            out_ptr + seq[:, None] * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_mask,
        )
        tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=row_live)


@dataclass(frozen=True)
class GroupLayout:
    """Live sequences sorted by group: what the prefix kernel needs to find a group's rows.

    Built once per decode step and reused by every layer (from a host list it costs no GPU work).
    """

    order: torch.Tensor  # int32 [B]: live sequence ids, group by group
    starts: torch.Tensor  # int32 [Ngroups]: first index of each group in `order`
    counts: torch.Tensor  # int32 [Ngroups]: live samples of each group
    max_live: int  # largest count: sizes the row tiles

    @property
    def num_groups(self) -> int:
        return self.counts.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.order.shape[0]

    @classmethod
    def build(
        cls, seq_group: Sequence[int] | torch.Tensor, num_groups: int, device: torch.device | str | None = None
    ) -> "GroupLayout":
        """From each live sequence's group index (a host list, or a tensor: then one device sync)."""
        if isinstance(seq_group, torch.Tensor):
            if seq_group.dim() != 1 or seq_group.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"GroupLayout: seq_group has shape {tuple(seq_group.shape)} dtype {seq_group.dtype}: "
                    "expected int32/int64 [B]"
                )
            if seq_group.numel() and not (0 <= int(seq_group.min()) and int(seq_group.max()) < num_groups):
                raise ValueError(f"GroupLayout: seq_group values must lie in [0, {num_groups})")
            order = torch.argsort(seq_group, stable=True).to(torch.int32)  # [B]
            counts = torch.zeros(num_groups, dtype=torch.int64, device=seq_group.device)  # [Ngroups]
            counts.scatter_add_(0, seq_group.long(), torch.ones_like(seq_group, dtype=torch.int64))
            starts = torch.cumsum(counts, 0) - counts  # [Ngroups]
            max_live = int(counts.max()) if num_groups else 0
            return cls(order, starts.to(torch.int32), counts.to(torch.int32), max_live)
        groups = [int(g) for g in seq_group]
        bad = [g for g in groups if not 0 <= g < num_groups]
        if bad:
            raise ValueError(f"GroupLayout: group index {bad[0]} is outside [0, {num_groups})")
        counts_list = [0] * num_groups
        for g in groups:
            counts_list[g] += 1
        starts_list, total = [], 0
        for c in counts_list:
            starts_list.append(total)
            total += c
        order_list = sorted(range(len(groups)), key=groups.__getitem__)  # stable
        flat = torch.tensor(order_list + starts_list + counts_list, dtype=torch.int32)  # one transfer
        flat = flat.to(device, non_blocking=True) if device is not None else flat
        B = len(groups)
        return cls(flat[:B], flat[B : B + num_groups], flat[B + num_groups :], max(counts_list, default=0))


def shared_prefix_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_group: torch.Tensor | GroupLayout,
    suffix_block_tables: torch.Tensor,
    suffix_lens: torch.Tensor,
    scale: float,
    *,
    prefix_splits: int | None = None,
    suffix_splits: int | None = None,
    return_lse: bool = False,
    block_n: int | None = None,
    prefix_block_n: int = PREFIX_BLOCK_N,
    max_tile_rows: int = MAX_TILE_ROWS,
    min_tile_rows: int = MIN_TILE_ROWS,
    prefix_num_warps: int | None = None,
    prefix_num_stages: int = 2,
    suffix_num_warps: int | None = None,
    suffix_num_stages: int | None = None,
    partial_dtype: torch.dtype | None = None,
    prefix_prefetch: bool = True,
    overlap_passes: bool = True,
    prefix_maxnreg: int | None = None,
    suffix_maxnreg: int | None = None,
    prefix_kernel: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of live sequences whose context is a group's shared prefix plus their own suffix.

    q [B, Hq, D]; caches [num_blocks, block_size, Hkv, D]; prefix_block_tables int32 [Ngroups, P] and
    prefix_lens int32 [Ngroups] (the shared full prompt blocks, tokens [0, prefix_len)); seq_group: the
    group of each live sequence, int32/int64 [B], or a GroupLayout built from it once per step;
    suffix_block_tables int32 [B, S] and suffix_lens int32 [B] (each sequence's own tokens after the
    prefix, the new token included). Returns out [B, Hq, D] (and the natural-log LSE fp32 [B, Hq] with
    return_lse), equal to paged attention over prefix + suffix. Splits default from the work against
    the SM count; with one suffix split the suffix kernel merges the prefix partials itself.
    The keyword-only launch options (tile sizes, warps, stages, register caps, the dtype the prefix
    partials are kept in between the kernels, prefix_prefetch: two K/V tiles in flight per prefix
    program, overlap_passes: the suffix kernel as a programmatic dependent of the prefix kernel) are
    tuning knobs; the defaults are the fastest measured. prefix_num_warps=None takes the warps and,
    unless prefix_maxnreg is given, the register cap from `prefix_launch_shape`. partial_dtype=None
    keeps the prefix partials in `default_partial_dtype(q.dtype)`. The suffix pass's options (block_n,
    suffix_num_warps, suffix_num_stages, suffix_maxnreg) left None take `suffix_launch_shape`'s values for
    the prefix kernel chosen. prefix_kernel picks the prefix pass:
    "gluon" (the warp-specialized Hopper kernel of `gluon_prefix`), "triton", or "auto" (`use_hopper_prefix`);
    the prefix launch options above (tile sizes, warps, stages, register caps, prefetch) are the Triton kernel's.
    """
    where = "shared_prefix_decode_attention"
    B, Hq, Hkv, D, page = check_paged_inputs(q, k_cache, v_cache, where)
    if prefix_block_tables.dim() != 2:
        raise ValueError(
            f"{where}: prefix block table has shape {tuple(prefix_block_tables.shape)}: expected [Ngroups, P]"
        )
    num_groups = prefix_block_tables.shape[0]
    check_table(prefix_block_tables, prefix_lens, num_groups, "prefix", where)
    check_table(suffix_block_tables, suffix_lens, B, "suffix", where)
    for name, value in (("block_n", block_n), ("prefix_block_n", prefix_block_n), ("max_tile_rows", max_tile_rows),
                        ("min_tile_rows", min_tile_rows)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"{where}: {name} = {value}: expected a power of two >= 16")
    if isinstance(seq_group, torch.Tensor):
        if seq_group.shape != (B,):
            raise ValueError(f"{where}: seq_group has shape {tuple(seq_group.shape)}: expected [{B}]")
        layout = GroupLayout.build(seq_group, num_groups)
    else:
        layout = seq_group
    if layout.num_seqs != B or layout.num_groups != num_groups:
        raise ValueError(
            f"{where}: group layout covers {layout.num_seqs} sequences in {layout.num_groups} groups: "
            f"expected {B} in {num_groups}"
        )
    out = torch.empty_like(q)  # [B, Hq, D]
    lse = torch.empty(B, Hq, device=q.device, dtype=torch.float32)  # [B, Hq]
    if B == 0:
        return (out, lse) if return_lse else out

    try:
        use_gluon = use_hopper_prefix(prefix_kernel, q, k_cache, v_cache, prefix_block_tables.shape[1] * page)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    gq = Hq // Hkv
    rows_needed = layout.max_live * gq
    rows = prefix_tile_rows(rows_needed, max_tile_rows, min_tile_rows)
    if use_gluon and rows not in (64, 128):  # its consumers are whole 64-row warpgroups
        if prefix_kernel == "gluon":
            raise ValueError(f"{where}: prefix_kernel = 'gluon' needs 64- or 128-row tiles, not {rows}")
        use_gluon = False
    row_tiles = triton.cdiv(rows_needed, rows)
    num_sms = sm_count(q.device.index) if q.device.type == "cuda" else DEFAULT_SM_COUNT
    prefix_warps, prefix_cap = prefix_launch_shape(rows)
    if prefix_num_warps is not None:  # an explicit launch shape: no register cap unless one is given too
        prefix_warps, prefix_cap = prefix_num_warps, None
    prefix_cap = prefix_maxnreg if prefix_maxnreg is not None else prefix_cap
    if prefix_splits is None:
        prefix_splits = choose_prefix_splits(
            num_groups * row_tiles * Hkv, rows, prefix_block_tables.shape[1] * page, num_sms,
            GLUON_PROGRAMS_PER_SM if use_gluon else None,
        )
    if suffix_splits is None:
        suffix_splits = choose_num_splits(B * Hkv, suffix_block_tables.shape[1] * page, num_sms)
    if prefix_splits < 1 or suffix_splits < 1:
        raise ValueError(f"{where}: prefix_splits = {prefix_splits}, suffix_splits = {suffix_splits}: expected >= 1")

    # With one suffix split the suffix kernel folds the prefix partials in; else all partials share one buffer.
    # It then starts as the prefix kernel's programmatic dependent, attending its own tokens on the room
    # the prefix programs leave, and waits for the prefix partials only before merging them.
    overlap = overlap_passes and suffix_splits == 1 and programmatic_launch_available(q.device)
    # The suffix programs' shape: small ones beside the Gluon kernel (see suffix_launch_shape); given options win.
    warps, tile, stages, cap = suffix_launch_shape(rows if use_gluon and overlap else None, D)
    suffix_num_warps = warps if suffix_num_warps is None else suffix_num_warps
    block_n = tile if block_n is None else block_n
    suffix_num_stages = stages if suffix_num_stages is None else suffix_num_stages
    suffix_maxnreg = cap if suffix_maxnreg is None else suffix_maxnreg
    total_splits = prefix_splits + (suffix_splits if suffix_splits > 1 else 0)
    if suffix_splits > 1:
        partial_dtype = torch.float32  # the merge kernel reads fp32 partials
    elif partial_dtype is None:
        partial_dtype = default_partial_dtype(q.dtype)
    part_out = torch.empty(B, Hq, total_splits, D, device=q.device, dtype=partial_dtype)  # [B, Hq, Sp (+ Ss), D]
    part_lse = torch.empty(B, Hq, total_splits, device=q.device, dtype=torch.float32)  # [B, Hq, Sp (+ Ss)]
    if use_gluon:
        launch_hopper_prefix(
            q, k_cache, v_cache, prefix_block_tables, prefix_lens, layout.order, layout.starts, layout.counts,
            part_out, part_lse, scale * LOG2E, prefix_splits, row_tiles, rows, page, launch_dependents=overlap,
        )
    else:
        _shared_prefix_kernel[(num_groups * row_tiles, Hkv, prefix_splits)](
            q, k_cache, v_cache, prefix_block_tables, prefix_lens, layout.order, layout.starts, layout.counts,
            part_out, part_lse,
            scale * LOG2E, prefix_splits, row_tiles,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            prefix_block_tables.stride(0),
            part_out.stride(0), part_out.stride(1), part_out.stride(2),
            part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
            HEAD_DIM=D, GQ=gq, ROWS=rows, BLOCK_N=prefix_block_n, PAGE=page,
            BLOCK_D=max(16, triton.next_power_of_2(D)), DOT_PRECISION=dot_precision(q.dtype),
            UPCAST=upcast_dots(q.dtype), PREFETCH=prefix_prefetch, LAUNCH_DEPENDENTS=overlap,
            OFFS_I32=offsets_fit_int32(k_cache, v_cache),
            num_stages=prefix_num_stages, num_warps=prefix_warps, **launch_options(maxnreg=prefix_cap),
        )
    if suffix_splits == 1:
        launch_paged_splits(
            q, k_cache, v_cache, suffix_block_tables, suffix_lens, scale, 1, out.unsqueeze(2), lse.unsqueeze(2),
            block_n=block_n, merge_from=(part_out, part_lse), num_warps=suffix_num_warps,
            num_stages=suffix_num_stages, overlap_prev=overlap, maxnreg=suffix_maxnreg,
        )
    else:
        launch_paged_splits(
            q, k_cache, v_cache, suffix_block_tables, suffix_lens, scale, suffix_splits, part_out, part_lse,
            split_offset=prefix_splits, block_n=block_n, num_warps=suffix_num_warps, num_stages=suffix_num_stages,
            maxnreg=suffix_maxnreg,
        )
        merge_attention_partials(part_out, part_lse, out, lse)
    return (out, lse) if return_lse else out
