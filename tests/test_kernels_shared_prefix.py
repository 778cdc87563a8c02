"""Shared-prefix (cascade) decode attention against a torch gather + softmax over prefix + suffix.

Groups have different live counts (1..G, and none), sequences come in arbitrary group order, and a
multi-step case drops finished samples between steps the way the engine does.
"""

import pytest
import torch

pytest.importorskip("triton")

from async_grpo.kv import shared_prefix, triton_paged  # noqa: E402
from async_grpo.kv.shared_prefix import (  # noqa: E402
    GroupLayout,
    default_partial_dtype,
    shared_prefix_decode_attention,
)
from async_grpo.kv.triton_kv_write import write_kv  # noqa: E402
from async_grpo.kv.triton_paged import paged_decode_attention  # noqa: E402

from test_kernels_paged import reference_decode_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_attention(q, k_cache, v_cache, tables, lens, scale):
    """fp64 reference over each sequence's tokens gathered through its (python list) block table."""
    out, _ = reference_decode_attention(q, k_cache, v_cache, [torch.tensor(t) for t in tables], lens, scale)
    return out


class CascadeCase:
    """A pool of blocks: per group shared full prompt blocks, per sequence its own suffix blocks."""

    def __init__(self, prefix_blocks, seq_group, suffix_lens, Hq, Hkv, D, page, dtype, seed, suffix_capacity=None):
        g = torch.Generator().manual_seed(seed)
        self.page, self.dtype = page, dtype
        self.prefix_blocks = prefix_blocks  # full prompt blocks per group
        self.seq_group = list(seq_group)
        self.suffix_lens = list(suffix_lens)
        cap = suffix_capacity or max(1, max((n + page - 1) // page for n in suffix_lens))
        num_blocks = sum(prefix_blocks) + len(seq_group) * cap + 2
        perm = torch.randperm(num_blocks, generator=g).tolist()
        self.prefix_tables = [[perm.pop() for _ in range(n)] for n in prefix_blocks]
        self.suffix_tables = [[perm.pop() for _ in range(cap)] for _ in seq_group]
        self.k_cache = torch.randn(num_blocks, page, Hkv, D, generator=g).to(dtype).to(DEVICE)
        self.v_cache = torch.randn(num_blocks, page, Hkv, D, generator=g).to(dtype).to(DEVICE)
        self.q = torch.randn(len(seq_group), Hq, D, generator=g).to(dtype).to(DEVICE)

    def tensors(self):
        P = max(1, max(self.prefix_blocks))
        ptab = torch.zeros(len(self.prefix_blocks), P, dtype=torch.int32)
        for i, t in enumerate(self.prefix_tables):
            ptab[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        plens = torch.tensor([n * self.page for n in self.prefix_blocks], dtype=torch.int32)
        stab = torch.tensor(self.suffix_tables, dtype=torch.int32)
        slens = torch.tensor(self.suffix_lens, dtype=torch.int32)
        sg = torch.tensor(self.seq_group, dtype=torch.int32)
        return [t.to(DEVICE) for t in (ptab, plens, sg, stab, slens)]

    def full_tables(self):
        tables = [self.prefix_tables[g] + self.suffix_tables[b] for b, g in enumerate(self.seq_group)]
        lens = [self.prefix_blocks[g] * self.page + self.suffix_lens[b] for b, g in enumerate(self.seq_group)]
        return tables, lens


@pytest.mark.parametrize("from_tensor", [False, True])
def test_group_layout_sorts_live_sequences_by_group(from_tensor):
    groups = [2, 0, 2, 0, 0]
    layout = GroupLayout.build(torch.tensor(groups) if from_tensor else groups, 4)
    assert layout.order.tolist() == [1, 3, 4, 0, 2]
    assert layout.starts.tolist() == [0, 3, 3, 5]
    assert layout.counts.tolist() == [3, 0, 2, 0]
    assert layout.max_live == 3


def test_group_layout_rejects_group_index_out_of_range():
    with pytest.raises(ValueError, match=r"group index 4 is outside \[0, 4\)"):
        GroupLayout.build([0, 4], 4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        GroupLayout.build(torch.tensor([0, 2]), 2)


@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("prefix_splits,suffix_splits", [(1, 1), (3, 1), (3, 2)])
def test_cascade_matches_reference_with_groups_of_different_live_counts(gqa, prefix_splits, suffix_splits):
    # group 0: 4 live, group 1: 1 live, group 2: 3 live, group 3: none (all finished); interleaved order.
    seq_group = [2, 0, 1, 0, 2, 0, 2, 0]
    suffix_lens = [1, 5, 17, 33, 16, 2, 9, 40]
    case = CascadeCase([2, 1, 4, 3], seq_group, suffix_lens, 2 * gqa, 2, 16, 16, torch.float32, seed=gqa)
    scale = 16**-0.5
    out = shared_prefix_decode_attention(
        case.q, case.k_cache, case.v_cache, *case.tensors(), scale,
        prefix_splits=prefix_splits, suffix_splits=suffix_splits, block_n=16, prefix_block_n=16,
    )
    tables, lens = case.full_tables()
    ref = reference_attention(case.q, case.k_cache, case.v_cache, tables, lens, scale)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=2e-5)


def test_cascade_with_bf16_prefix_partials_stays_within_their_rounding():
    # Five prefix splits (padded to 8 in the suffix kernel's one-shot merge), partials rounded to bf16
    # between the kernels: the merged output moves by at most about one bf16 step of |out| (<= 1 here).
    seq_group = [0, 1, 1, 0, 1, 0]
    case = CascadeCase([6, 5], seq_group, [4, 20, 1, 31, 16, 3], 4, 2, 16, 16, torch.float32, seed=5)
    tables, lens = case.full_tables()
    ref = reference_attention(case.q, case.k_cache, case.v_cache, tables, lens, 0.25)
    common = dict(prefix_splits=5, suffix_splits=1, block_n=16, prefix_block_n=16)
    exact = shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, *case.tensors(), 0.25, **common)
    rounded = shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, *case.tensors(), 0.25,
                                             partial_dtype=torch.bfloat16, **common)
    torch.testing.assert_close(exact.cpu().double(), ref, atol=2e-5, rtol=2e-5)
    error = (rounded.cpu().double() - ref).abs().max().item()
    assert 0 < error < 2**-7  # rounded (so not the fp32 path), but only by bf16's 8-bit mantissa


@pytest.mark.parametrize("prefix_splits", [1, 3])
def test_cascade_prefetching_prefix_loop_gives_the_same_sums(prefix_splits):
    # The prefetching loop only issues the next tile's loads earlier: same tiles, same order, same sums
    # (bit for bit in the interpreter; a GPU compiler may contract the maths differently).
    seq_group = [1, 0, 1, 1, 0]
    case = CascadeCase([5, 3], seq_group, [2, 19, 7, 33, 16], 4, 2, 16, 16, torch.float32, seed=11)
    common = dict(prefix_splits=prefix_splits, block_n=16, prefix_block_n=16, return_lse=True)
    out, lse = shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, *case.tensors(), 0.3,
                                              prefix_prefetch=False, **common)
    out_p, lse_p = shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, *case.tensors(), 0.3,
                                                  prefix_prefetch=True, **common)
    if DEVICE == "cpu":
        assert torch.equal(out, out_p) and torch.equal(lse, lse_p)
    else:
        torch.testing.assert_close(out_p, out, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse_p, lse, atol=1e-6, rtol=1e-6)
    tables, lens = case.full_tables()
    ref = reference_attention(case.q, case.k_cache, case.v_cache, tables, lens, 0.3)
    torch.testing.assert_close(out_p.cpu().double(), ref, atol=2e-5, rtol=2e-5)


def test_cascade_head_dim_not_power_of_two_and_partial_tiles():
    # head_dim 24 pads to 32 columns (masked loads); 32-token prefix tiles over 48- and 80-token prefixes
    # leave a partial last tile, and 3 splits leave a split empty; the prefetching loop clamps its loads.
    seq_group = [0, 1, 1, 0, 1]
    case = CascadeCase([3, 5], seq_group, [4, 20, 1, 31, 16], 6, 2, 24, 16, torch.float32, seed=13)
    out = shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, *case.tensors(), 24**-0.5,
                                         prefix_splits=3, block_n=32, prefix_block_n=32)
    tables, lens = case.full_tables()
    ref = reference_attention(case.q, case.k_cache, case.v_cache, tables, lens, 24**-0.5)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=2e-5)


def test_cascade_int64_offsets_give_the_int32_result(monkeypatch):
    seq_group = [1, 0, 1, 1, 0]
    case = CascadeCase([5, 3], seq_group, [2, 19, 7, 33, 16], 4, 2, 16, 16, torch.float32, seed=12)
    common = dict(prefix_splits=2, block_n=16, prefix_block_n=32, return_lse=True)
    out32, lse32 = shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, *case.tensors(), 0.3, **common)
    asked = []
    for module in (shared_prefix, triton_paged):  # the prefix kernel's launch and the suffix pass's
        monkeypatch.setattr(module, "offsets_fit_int32", lambda *tensors: asked.append(len(tensors)) or False)
    out64, lse64 = shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, *case.tensors(), 0.3, **common)
    assert len(asked) == 2
    torch.testing.assert_close(out64, out32, atol=0, rtol=0)
    torch.testing.assert_close(lse64, lse32, atol=0, rtol=0)
    tables, lens = case.full_tables()
    ref = reference_attention(case.q, case.k_cache, case.v_cache, tables, lens, 0.3)
    torch.testing.assert_close(out64.cpu().double(), ref, atol=2e-5, rtol=2e-5)


def test_cascade_equals_plain_paged_kernel_including_lse():
    seq_group = [0, 1, 1, 0, 1]
    case = CascadeCase([3, 2], seq_group, [4, 20, 1, 31, 16], 4, 2, 32, 16, torch.float32, seed=9)
    scale = 0.2
    out, lse = shared_prefix_decode_attention(
        case.q, case.k_cache, case.v_cache, *case.tensors(), scale, return_lse=True, block_n=32, prefix_block_n=32
    )
    tables, lens = case.full_tables()
    width = max(len(t) for t in tables)
    full = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ref_out, ref_lse = paged_decode_attention(
        case.q, case.k_cache, case.v_cache, full, ctx, scale, num_splits=1, return_lse=True, block_n=32
    )
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_cascade_splits_a_large_group_over_several_row_tiles():
    # 6 live samples x 4 query heads = 24 rows, tiles of 16 rows: two tiles per group and KV head.
    seq_group = [0, 0, 0, 1, 0, 0, 0]
    case = CascadeCase([2, 1], seq_group, [3, 9, 1, 12, 20, 7, 16], 4, 1, 16, 16, torch.float32, seed=4)
    out = shared_prefix_decode_attention(
        case.q, case.k_cache, case.v_cache, *case.tensors(), 0.25,
        block_n=16, prefix_block_n=16, max_tile_rows=16, prefix_splits=2,
    )
    tables, lens = case.full_tables()
    ref = reference_attention(case.q, case.k_cache, case.v_cache, tables, lens, 0.25)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=2e-5)


def test_cascade_stays_exact_as_samples_finish_at_different_steps():
    # One group of 4 samples and one of 2; each step every live sample appends a token (write_kv into its
    # own blocks) and then attends; samples leave the live set at different steps.
    Hq, Hkv, D, page = 4, 2, 16, 16
    seq_ids = [0, 1, 2, 3, 4, 5]
    groups = {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1}
    start_lens = {0: 3, 1: 14, 2: 15, 3: 1, 4: 7, 5: 2}
    finish_after = {0: 2, 1: 4, 2: 1, 3: 3, 4: 4, 5: 1}  # steps each sample lives
    case = CascadeCase([2, 1], [groups[s] for s in seq_ids], [start_lens[s] for s in seq_ids], Hq, Hkv, D, page,
                       torch.float32, seed=12, suffix_capacity=2)
    g = torch.Generator().manual_seed(1)
    lens = dict(start_lens)
    for step in range(4):
        live = [s for s in seq_ids if finish_after[s] > step]
        new_slots = []
        for s in live:
            new_slots.append(case.suffix_tables[s][lens[s] // page] * page + lens[s] % page)
            lens[s] += 1
        k_new = torch.randn(len(live), Hkv, D, generator=g).to(DEVICE)
        v_new = torch.randn(len(live), Hkv, D, generator=g).to(DEVICE)
        write_kv(k_new, v_new, case.k_cache, case.v_cache, torch.tensor(new_slots, dtype=torch.int32, device=DEVICE))
        q = torch.randn(len(live), Hq, D, generator=g).to(DEVICE)
        ptab, plens, _, _, _ = case.tensors()
        stab = torch.tensor([case.suffix_tables[s] for s in live], dtype=torch.int32, device=DEVICE)
        slens = torch.tensor([lens[s] for s in live], dtype=torch.int32, device=DEVICE)
        layout = GroupLayout.build([groups[s] for s in live], 2, DEVICE)
        assert layout.max_live == max([groups[s] for s in live].count(g) for g in (0, 1))
        out = shared_prefix_decode_attention(
            q, case.k_cache, case.v_cache, ptab, plens, layout, stab, slens, 0.25, block_n=16, prefix_block_n=16
        )
        tables = [case.prefix_tables[groups[s]] + case.suffix_tables[s] for s in live]
        full_lens = [case.prefix_blocks[groups[s]] * page + lens[s] for s in live]
        ref = reference_attention(q, case.k_cache, case.v_cache, tables, full_lens, 0.25)
        torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=2e-5, msg=f"step {step}, live {live}")


def test_cascade_bf16_matches_reference():
    seq_group = [1, 0, 1]
    case = CascadeCase([2, 3], seq_group, [5, 16, 30], 4, 2, 16, 16, torch.bfloat16, seed=6)
    out = shared_prefix_decode_attention(
        case.q, case.k_cache, case.v_cache, *case.tensors(), 0.25, block_n=16, prefix_block_n=16
    )
    assert out.dtype == torch.bfloat16
    tables, lens = case.full_tables()
    ref = reference_attention(case.q, case.k_cache, case.v_cache, tables, lens, 0.25)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-2, rtol=2e-2)


def test_cascade_keeps_a_16_bit_models_prefix_partials_in_its_own_dtype():
    assert default_partial_dtype(torch.bfloat16) == torch.bfloat16
    assert default_partial_dtype(torch.float16) == torch.float16
    assert default_partial_dtype(torch.float32) == torch.float32
    seq_group = [1, 0, 1, 0]
    case = CascadeCase([4, 3], seq_group, [5, 16, 30, 2], 4, 2, 16, 16, torch.bfloat16, seed=8)
    common = dict(prefix_splits=3, block_n=16, prefix_block_n=16)
    by_default = shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, *case.tensors(), 0.25, **common)
    rounded = shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, *case.tensors(), 0.25,
                                             partial_dtype=torch.bfloat16, **common)
    wide = shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, *case.tensors(), 0.25,
                                          partial_dtype=torch.float32, **common)
    assert torch.equal(by_default, rounded) and not torch.equal(by_default, wide)
    tables, lens = case.full_tables()
    ref = reference_attention(case.q, case.k_cache, case.v_cache, tables, lens, 0.25)
    torch.testing.assert_close(by_default.cpu().double(), ref, atol=2e-2, rtol=2e-2)


def test_cascade_rejects_bad_group_vector():
    case = CascadeCase([1], [0, 0], [2, 3], 2, 1, 16, 16, torch.float32, seed=0)
    ptab, plens, sg, stab, slens = case.tensors()
    with pytest.raises(ValueError, match=r"seq_group has shape \(3,\): expected \[2\]"):
        bad_groups = torch.zeros(3, dtype=torch.int32, device=DEVICE)
        shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, ptab, plens, bad_groups, stab, slens, 0.25)
    with pytest.raises(ValueError, match="prefix lengths"):
        shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, ptab, plens.long(), sg, stab, slens, 0.25)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("gqa,G", [(1, 16), (7, 16), (8, 8), (7, 20)])
def test_cascade_long_prompts_bf16_on_gpu(gqa, G):
    # 4 groups with 4k / 1k / 2k / 16-token prompts; live counts G, G-3, 1, G//2.
    live = [G, G - 3, 1, G // 2]
    seq_group = [g for g, n in enumerate(live) for _ in range(n)]
    g = torch.Generator().manual_seed(gqa)
    perm = torch.randperm(len(seq_group), generator=g).tolist()
    seq_group = [seq_group[i] for i in perm]
    suffix_lens = torch.randint(1, 300, (len(seq_group),), generator=g).tolist()
    case = CascadeCase([256, 64, 128, 1], seq_group, suffix_lens, 2 * gqa, 2, 64, 16, torch.bfloat16, seed=gqa)
    out = shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, *case.tensors(), 0.125)
    tables, lens = case.full_tables()
    ref = reference_attention(case.q, case.k_cache, case.v_cache, tables, lens, 0.125)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-2, rtol=2e-2)


def test_programmatic_launch_is_only_used_where_it_exists():
    from async_grpo.kv.triton_paged import programmatic_launch_available

    assert not programmatic_launch_available(torch.device("cpu"))
    if DEVICE == "cuda":  # a compiled kernel on Hopper or later; never under the interpreter
        import os

        expected = torch.cuda.get_device_capability()[0] >= 9 and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
        assert programmatic_launch_available(torch.device("cuda", torch.cuda.current_device())) == expected


@gpu
@pytest.mark.gpu
def test_overlapped_suffix_pass_gives_the_serial_result_bit_for_bit():
    # The suffix kernel launched while the prefix kernel still runs (programmatic dependent launch) must
    # wait for every prefix partial before merging: same inputs, same kernels, so the same bits. Many
    # groups with long prompts and short suffixes make the suffix programs reach their merge early.
    from async_grpo.kv.triton_paged import programmatic_launch_available

    if not programmatic_launch_available(torch.device("cuda", torch.cuda.current_device())):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or later")
    live = [16] * 24 + [9, 1]
    seq_group = [g for g, n in enumerate(live) for _ in range(n)]
    g = torch.Generator().manual_seed(3)
    suffix_lens = torch.randint(1, 40, (len(seq_group),), generator=g).tolist()
    case = CascadeCase([256] * 24 + [64, 8], seq_group, suffix_lens, 14, 2, 64, 16, torch.bfloat16, seed=3)
    # The Triton prefix kernel here ("auto" may take the Gluon one, whose overlap the test below checks): the
    # suffix programs then have one launch shape whether or not they overlap the prefix pass.
    serial, lse_serial = shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, *case.tensors(), 0.125,
                                                        overlap_passes=False, return_lse=True, prefix_kernel="triton")
    for _ in range(20):  # a missing wait shows as a race, so run it several times
        out, lse = shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, *case.tensors(), 0.125,
                                                  overlap_passes=True, return_lse=True, prefix_kernel="triton")
        assert torch.equal(out, serial) and torch.equal(lse, lse_serial)


def test_prefix_kernel_choice():
    from async_grpo.kv.gluon_prefix import hopper_prefix_supported
    from async_grpo.kv.shared_prefix import GLUON_MIN_PREFIX_TOKENS, use_hopper_prefix
    from async_grpo.kv.triton_paged import interpreting

    case = CascadeCase([2, 1], [0, 0, 1], [5, 9, 1], 4, 2, 64, 16, torch.bfloat16, seed=0)
    q, kc, vc = case.q, case.k_cache, case.v_cache
    # The Gluon kernel exists only compiled on sm_90; "auto" takes it there, for long prompts only.
    hopper = DEVICE == "cuda" and not interpreting() and torch.cuda.get_device_capability() == (9, 0)
    assert hopper_prefix_supported(q, kc, vc) == hopper
    assert use_hopper_prefix("auto", q, kc, vc, GLUON_MIN_PREFIX_TOKENS) == hopper
    assert not use_hopper_prefix("auto", q, kc, vc, GLUON_MIN_PREFIX_TOKENS - 16)
    assert not use_hopper_prefix("triton", q, kc, vc, 4 * GLUON_MIN_PREFIX_TOKENS)
    # fp32 caches, the exactness reference, never take it.
    assert not hopper_prefix_supported(q.float(), kc.float(), vc.float())
    if not hopper:
        with pytest.raises(ValueError, match="'gluon' needs a compiled sm_90 GPU"):
            use_hopper_prefix("gluon", q, kc, vc, 4096)
    with pytest.raises(ValueError, match="prefix_kernel = 'fast'"):
        shared_prefix_decode_attention(q, kc, vc, *case.tensors(), 0.125, prefix_kernel="fast")


def test_gluon_stage_size_and_split_rule():
    from async_grpo.kv.backend import shared_prefix_splits
    from async_grpo.kv.gluon_prefix import GLUON_PROGRAMS_PER_SM, gluon_block_n, launch_hopper_prefix

    # 32 KB of K + V per stage: 128 tokens at head_dim 64, 64 at 128.
    assert gluon_block_n(64) == 128 and gluon_block_n(128) == 64
    # One Gluon program per SM: prompt 4k, G 16 (16 groups x 2 KV heads of 128 rows) takes 4 splits on 132 SMs,
    # where the Triton kernel (two per SM) takes 8.
    assert GLUON_PROGRAMS_PER_SM == 1
    assert shared_prefix_splits(256, 16, 14, 2, 4096, num_sms=132, gluon=True) == 4
    assert shared_prefix_splits(256, 16, 14, 2, 4096, num_sms=132) == 8
    with pytest.raises(ValueError, match="rows = 32"):
        launch_hopper_prefix(*([None] * 13), 32, 16)


def test_suffix_programs_are_small_enough_for_four_beside_a_gluon_program():
    from async_grpo.kv.gluon_prefix import GLUON_MAXNREG, PRODUCER_WARPS
    from async_grpo.kv.shared_prefix import SUFFIX_NUM_STAGES, suffix_launch_shape
    from async_grpo.kv.triton_paged import DEFAULT_BLOCK_N

    register_file = 64 * 1024  # 32-bit registers of an SM (sm_90)
    for rows in (64, 128):
        gluon_threads = (rows // 64 * 4 + PRODUCER_WARPS) * 32
        room = register_file - gluon_threads * GLUON_MAXNREG
        for head_dim in (64, 128):
            warps, tokens, stages, cap = suffix_launch_shape(rows, head_dim)
            assert cap is not None and 4 * warps * 32 * cap <= room, (rows, head_dim)
            assert stages >= 2 and tokens >= 16 and tokens & (tokens - 1) == 0
            # The same K/V bytes a tile at either head_dim, so the same registers hold them.
            assert tokens * head_dim == suffix_launch_shape(rows, 64)[1] * 64
    # Without the Gluon kernel nothing runs beside the prefix programs: the 4-warp one-stage programs.
    assert suffix_launch_shape(None) == (4, DEFAULT_BLOCK_N, SUFFIX_NUM_STAGES, None)


def _gluon_or_skip():
    from async_grpo.kv.gluon_prefix import hopper_prefix_supported

    probe = torch.zeros(1, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    if not hopper_prefix_supported(probe, probe.view(1, 1, 2, 64), probe.view(1, 1, 2, 64)):
        pytest.skip("the Gluon prefix kernel needs a compiled sm_90 GPU")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gqa,G,D,splits", [(7, 16, 64, None), (7, 20, 64, 3), (4, 16, 128, None), (1, 8, 64, 16),
                                             (8, 4, 64, 2)])
def test_gluon_prefix_kernel_matches_reference_and_the_triton_kernel(dtype, gqa, G, D, splits):
    # Groups with 4k / 1k+ / 2k / 16-token prompts (partial 128-token stages, empty splits) and live counts
    # G, G-3, 1, G//2 in shuffled order; both row tiles (64 and 128 rows) and both head dims.
    _gluon_or_skip()
    live = [G, max(1, G - 3), 1, max(1, G // 2)]
    seq_group = [g for g, n in enumerate(live) for _ in range(n)]
    g = torch.Generator().manual_seed(gqa * G + D)
    perm = torch.randperm(len(seq_group), generator=g).tolist()
    seq_group = [seq_group[i] for i in perm]
    suffix_lens = torch.randint(1, 300, (len(seq_group),), generator=g).tolist()
    case = CascadeCase([256, 67, 128, 1], seq_group, suffix_lens, 2 * gqa, 2, D, 16, dtype, seed=gqa)
    scale = D**-0.5
    out, lse = shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, *case.tensors(), scale,
                                              prefix_splits=splits, prefix_kernel="gluon", return_lse=True)
    tables, lens = case.full_tables()
    ref = reference_attention(case.q, case.k_cache, case.v_cache, tables, lens, scale)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-2, rtol=2e-2)
    # Same partials as the Triton prefix kernel: the same tiles in the same order, so the same sums.
    out_t, lse_t = shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, *case.tensors(), scale,
                                                  prefix_splits=splits, prefix_kernel="triton", return_lse=True)
    torch.testing.assert_close(lse, lse_t, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.float(), out_t.float(), atol=4e-3, rtol=0)


@gpu
@pytest.mark.gpu
def test_gluon_prefix_kernel_is_chosen_for_long_prompts_and_overlaps_exactly():
    from async_grpo.kv.shared_prefix import GLUON_MIN_PREFIX_TOKENS, suffix_launch_shape, use_hopper_prefix

    _gluon_or_skip()
    live = [16] * 12 + [9]
    seq_group = [g for g, n in enumerate(live) for _ in range(n)]
    g = torch.Generator().manual_seed(5)
    suffix_lens = torch.randint(1, 40, (len(seq_group),), generator=g).tolist()
    case = CascadeCase([256] * 12 + [200], seq_group, suffix_lens, 14, 2, 64, 16, torch.bfloat16, seed=5)
    assert use_hopper_prefix("auto", case.q, case.k_cache, case.v_cache, GLUON_MIN_PREFIX_TOKENS)
    assert not use_hopper_prefix("auto", case.q, case.k_cache, case.v_cache, GLUON_MIN_PREFIX_TOKENS - 16)
    # Serially, the same small suffix programs that "auto" launches beside the Gluon kernel (128-row tiles).
    warps, tokens, stages, cap = suffix_launch_shape(128, 64)
    serial, lse_serial = shared_prefix_decode_attention(
        case.q, case.k_cache, case.v_cache, *case.tensors(), 0.125, overlap_passes=False, return_lse=True,
        block_n=tokens, suffix_num_warps=warps, suffix_num_stages=stages, suffix_maxnreg=cap,
    )
    for _ in range(20):  # the suffix kernel starts beside the Gluon kernel: it must still wait for every partial
        out, lse = shared_prefix_decode_attention(case.q, case.k_cache, case.v_cache, *case.tensors(), 0.125,
                                                  return_lse=True)
        assert torch.equal(out, serial) and torch.equal(lse, lse_serial)
