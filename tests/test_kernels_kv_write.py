"""write_kv (Triton) against torch index_put into the same paged layout."""

import pytest
import torch

pytest.importorskip("triton")

from async_grpo.kv.triton_kv_write import write_kv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_write(k, v, k_cache, v_cache, slot_mapping):
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    page = k_cache.shape[1]
    k_cache.index_put_((slots // page, slots % page), k[keep])
    v_cache.index_put_((slots // page, slots % page), v[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_write_kv_matches_index_put(dtype, index_dtype):
    g = torch.Generator().manual_seed(0)
    num_blocks, page, H, D, T = 6, 16, 2, 24, 21
    slots = torch.randperm(num_blocks * page, generator=g)[:T].to(index_dtype)
    k = torch.randn(T, H, D, generator=g).to(dtype)
    v = torch.randn(T, H, D, generator=g).to(dtype)
    kc = torch.randn(num_blocks, page, H, D, generator=g).to(dtype)
    vc = torch.randn(num_blocks, page, H, D, generator=g).to(dtype)
    ref_k, ref_v = kc.clone(), vc.clone()
    reference_write(k, v, ref_k, ref_v, slots)
    dev = [t.to(DEVICE) for t in (k, v, kc, vc, slots)]
    write_kv(*dev)
    assert torch.equal(dev[2].cpu(), ref_k)
    assert torch.equal(dev[3].cpu(), ref_v)


def test_write_kv_skips_negative_slots_and_leaves_other_slots_untouched():
    page, H, D = 4, 1, 16
    kc = torch.zeros(3, page, H, D, device=DEVICE)
    vc = torch.zeros(3, page, H, D, device=DEVICE)
    k = torch.ones(3, H, D, device=DEVICE) * torch.tensor([1.0, 2.0, 3.0], device=DEVICE)[:, None, None]
    slots = torch.tensor([5, -1, 11], dtype=torch.int32, device=DEVICE)
    write_kv(k, -k, kc, vc, slots)
    assert torch.equal(kc[1, 1, 0].cpu(), torch.full((D,), 1.0))
    assert torch.equal(kc[2, 3, 0].cpu(), torch.full((D,), 3.0))
    assert torch.equal(vc[2, 3, 0].cpu(), torch.full((D,), -3.0))
    assert int((kc != 0).any(-1).sum()) == 2  # exactly the two kept tokens were written


def test_write_kv_rejects_mismatched_shapes_and_dtypes():
    kc = torch.zeros(2, 4, 2, 16, device=DEVICE)
    k = torch.zeros(3, 2, 16, device=DEVICE)
    slots = torch.arange(3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"new rows are \[1, 16\]"):
        write_kv(k[:, :1], k[:, :1], kc, kc.clone(), slots)
    with pytest.raises(ValueError, match="cast before writing"):
        write_kv(k.half(), k.half(), kc, kc.clone(), slots)
    with pytest.raises(ValueError, match=r"expected int32/int64 \[3\]"):
        write_kv(k, k, kc, kc.clone(), slots[:2])
