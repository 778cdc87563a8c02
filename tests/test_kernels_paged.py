"""Fused paged decode attention (Triton) against a plain torch gather + softmax.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET
before triton is imported), with small shapes; the GPU cases (long contexts, GQA up to 8, bf16) skip without CUDA.
"""

import pytest
import torch

pytest.importorskip("triton")

from async_grpo.kv import triton_paged  # noqa: E402
from async_grpo.kv.triton_paged import choose_num_splits, offsets_fit_int32, paged_decode_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Gather each sequence's K/V through its block table, softmax in fp64; returns (out, lse)."""
    B, Hq, D = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        n = int(context_lens[b])
        if n == 0:
            continue
        tok = torch.arange(n)
        blocks = block_tables[b].long().cpu()[tok // page]
        k = k_cache.cpu()[blocks, tok % page].double()  # [n, Hkv, D]
        v = v_cache.cpu()[blocks, tok % page].double()
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # [n, Hq, D]
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].cpu().double(), k) * scale  # [Hq, n]
        lse[b] = torch.logsumexp(s, dim=1)
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=1), v)
    return out, lse


def make_paged_case(B, Hq, Hkv, D, page, context_lens, dtype, seed, device=DEVICE, spare_blocks=3):
    """Random q/caches and block tables drawn without replacement from a shuffled pool."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(n + page - 1) // page for n in context_lens]
    width = max(1, max(blocks_per_seq))
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(B, width, dtype=torch.int32)
    used = 0
    for b, nb in enumerate(blocks_per_seq):
        table[b, :nb] = perm[used : used + nb].int()
        used += nb
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    k_cache = torch.randn(num_blocks, page, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, page, Hkv, D, generator=g).to(dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return [t.to(device) for t in (q, k_cache, v_cache, table, lens)]


@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_matches_reference_fp32(gqa, num_splits):
    Hkv, D, page = 2, 16, 16
    lens = [1, 15, 16, 17, 70, 33]
    q, kc, vc, table, ctx = make_paged_case(len(lens), Hkv * gqa, Hkv, D, page, lens, torch.float32, seed=gqa)
    scale = D**-0.5
    out, lse = paged_decode_attention(q, kc, vc, table, ctx, scale, num_splits=num_splits, block_n=16, return_lse=True)
    ref_out, ref_lse = reference_decode_attention(q, kc, vc, table, ctx, scale)
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=2e-5, rtol=2e-5)


def test_paged_decode_tiles_spanning_several_blocks_with_many_splits():
    # block_n 32 over 8-token blocks: each tile reads four blocks; 5 splits leave some splits empty.
    Hkv, gqa, D, page = 1, 2, 32, 8
    lens = [3, 41, 64]
    q, kc, vc, table, ctx = make_paged_case(len(lens), Hkv * gqa, Hkv, D, page, lens, torch.float32, seed=7)
    out = paged_decode_attention(q, kc, vc, table, ctx, 0.3, num_splits=5, block_n=32)
    ref_out, _ = reference_decode_attention(q, kc, vc, table, ctx, 0.3)
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=2e-5, rtol=2e-5)


def test_paged_decode_bf16_matches_reference():
    Hkv, gqa, D, page = 2, 2, 16, 16
    lens = [5, 40, 70]
    q, kc, vc, table, ctx = make_paged_case(len(lens), Hkv * gqa, Hkv, D, page, lens, torch.bfloat16, seed=3)
    out = paged_decode_attention(q, kc, vc, table, ctx, D**-0.5, num_splits=2, block_n=16)
    assert out.dtype == torch.bfloat16
    ref_out, _ = reference_decode_attention(q, kc, vc, table, ctx, D**-0.5)
    # bf16 probabilities in the PV dot and a bf16 output: about 3 significant digits.
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=2e-2, rtol=2e-2)


def test_int32_offsets_only_where_every_cache_offset_fits():
    # Shapes and strides only (meta tensors hold no memory): the last element's offset decides.
    fits = torch.empty(2**31 // 4096, 16, 4, 64, device="meta")  # last offset 2^31 - 1
    too_big = torch.empty(2**31 // 4096 + 1, 16, 4, 64, device="meta")
    assert offsets_fit_int32(fits) and not offsets_fit_int32(too_big)
    assert not offsets_fit_int32(fits, too_big)
    # A strided view reaches past its element count: [:, ::2] of the big cache still spans it all.
    assert not offsets_fit_int32(too_big[:, ::2])
    assert offsets_fit_int32(torch.empty(0, 16, 4, 64, device="meta"))


def test_paged_decode_int64_offsets_give_the_int32_result(monkeypatch):
    # Caches past 2^31 elements index in int64; small ones in int32. Forced here: the same tiles, the same sums.
    lens = [37, 5, 64, 18]
    q, kc, vc, table, ctx = make_paged_case(len(lens), 4, 2, 16, 16, lens, torch.float32, seed=4)
    out32, lse32 = paged_decode_attention(q, kc, vc, table, ctx, 0.25, num_splits=2, block_n=16, return_lse=True)
    asked = []
    monkeypatch.setattr(triton_paged, "offsets_fit_int32", lambda *tensors: asked.append(len(tensors)) or False)
    out64, lse64 = paged_decode_attention(q, kc, vc, table, ctx, 0.25, num_splits=2, block_n=16, return_lse=True)
    assert asked  # the launch asked, and got int64
    torch.testing.assert_close(out64, out32, atol=0, rtol=0)
    torch.testing.assert_close(lse64, lse32, atol=0, rtol=0)
    ref_out, _ = reference_decode_attention(q, kc, vc, table, ctx, 0.25)
    torch.testing.assert_close(out64.cpu().double(), ref_out, atol=2e-5, rtol=2e-5)


def test_paged_decode_head_dim_not_power_of_two():
    Hkv, gqa, D, page = 1, 3, 24, 16
    lens = [20, 9]
    q, kc, vc, table, ctx = make_paged_case(len(lens), Hkv * gqa, Hkv, D, page, lens, torch.float32, seed=11)
    out = paged_decode_attention(q, kc, vc, table, ctx, D**-0.5, num_splits=2, block_n=16)
    ref_out, _ = reference_decode_attention(q, kc, vc, table, ctx, D**-0.5)
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=2e-5, rtol=2e-5)


def test_paged_decode_empty_context_gives_zero_output_and_minus_inf_lse():
    q, kc, vc, table, ctx = make_paged_case(2, 2, 1, 16, 16, [0, 5], torch.float32, seed=5)
    out, lse = paged_decode_attention(q, kc, vc, table, ctx, 0.25, num_splits=2, block_n=16, return_lse=True)
    assert torch.equal(out[0].cpu(), torch.zeros(2, 16))
    assert torch.isinf(lse[0]).all() and (lse[0] < 0).all()
    assert torch.isfinite(out[1]).all()


def test_choose_num_splits_fills_the_sms_and_respects_context():
    assert choose_num_splits(512, 4096, 132) == 1  # 256 seqs x 2 kv heads already cover 132 SMs twice
    assert choose_num_splits(8, 4096, 132) == 16  # 264 / 8 = 33 wanted, 4096 / 256 = 16 allowed
    assert choose_num_splits(2, 100_000, 132) == 64  # capped at MAX_SPLITS
    assert choose_num_splits(4, 200, 132) == 1  # too short to split


def test_paged_decode_rejects_bad_inputs_with_clear_errors():
    q, kc, vc, table, ctx = make_paged_case(2, 4, 2, 16, 16, [3, 4], torch.float32, seed=1)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        paged_decode_attention(q[:, :3], kc, vc, table, ctx, 0.25)
    with pytest.raises(ValueError, match="expected int32"):
        paged_decode_attention(q, kc, vc, table.long(), ctx, 0.25)
    with pytest.raises(ValueError, match="the same for all three"):
        paged_decode_attention(q.half(), kc, vc, table, ctx, 0.25)
    with pytest.raises(ValueError, match="num_splits = 0"):
        paged_decode_attention(q, kc, vc, table, ctx, 0.25, num_splits=0)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("gqa", [1, 2, 4, 7, 8])
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_paged_decode_long_contexts_bf16_on_gpu(gqa, num_splits):
    Hkv, D, page = 2, 64, 16
    lens = [1, 17, 1000, 4096, 2500, 3333]
    q, kc, vc, table, ctx = make_paged_case(len(lens), Hkv * gqa, Hkv, D, page, lens, torch.bfloat16, seed=gqa)
    out, lse = paged_decode_attention(q, kc, vc, table, ctx, D**-0.5, num_splits=num_splits, return_lse=True)
    ref_out, ref_lse = reference_decode_attention(q, kc, vc, table, ctx, D**-0.5)
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-2, rtol=1e-3)


@gpu
@pytest.mark.gpu
def test_paged_decode_fp32_head_dim_128_on_gpu():
    Hkv, gqa, D, page = 4, 2, 128, 16
    lens = [4096, 31, 700]
    q, kc, vc, table, ctx = make_paged_case(len(lens), Hkv * gqa, Hkv, D, page, lens, torch.float32, seed=2)
    out = paged_decode_attention(q, kc, vc, table, ctx, D**-0.5)
    ref_out, _ = reference_decode_attention(q, kc, vc, table, ctx, D**-0.5)
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=1e-4, rtol=1e-4)
