"""The torch reference paged attention against plain per-sequence causal attention."""

import math

import pytest
import torch

from async_grpo.config import KVConfig
from async_grpo.kv.backend import select_backend
from async_grpo.kv.pool import KVPool
from async_grpo.kv.step_metadata import StepMetadata
from async_grpo.kv.torch_attention import TorchPagedAttention


def dense_attention(q, k, v, q_start):
    """q [Tq, Hq, D] at positions q_start.., k/v [Tk, Hkv, D]: causal softmax attention, looped and plain."""
    hq, hkv = q.shape[1], k.shape[1]
    out = torch.empty_like(q)
    for t in range(q.shape[0]):
        for h in range(hq):
            keys = k[: q_start + t + 1, h // (hq // hkv)]
            scores = keys @ q[t, h] / math.sqrt(q.shape[-1])
            out[t, h] = torch.softmax(scores, 0) @ v[: q_start + t + 1, h // (hq // hkv)]
    return out


def run_step(pool, layer, seqs, feeds, gen, hq, hkv, d):
    """Feed `feeds[i]` new tokens to sequence seqs[i]; return (q, k, v, out) of the step."""
    slots, tables, ctx = [], [], []
    for seq, count in zip(seqs, feeds):
        start = pool.seq_len(seq)
        slots.append(pool.append_slots(seq, count))
        tables.append(pool.block_table(seq))
        ctx.append(start + count)
    meta = StepMetadata.build(slots, tables, ctx, pool.block_size, torch.device("cpu"))
    t = sum(feeds)
    q = torch.randn(t, hq, d, generator=gen)  # [T, Hq, D]
    k = torch.randn(t, hkv, d, generator=gen)  # [T, Hkv, D]
    v = torch.randn(t, hkv, d, generator=gen)
    out = TorchPagedAttention(pool, meta).attend(layer, q, k, v)
    return q, k, v, out


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (4, 1)])
def test_prefill_then_decode_matches_dense_causal_attention(hq, hkv):
    d, gen = 8, torch.Generator().manual_seed(0)
    pool = KVPool(KVConfig(block_size=4, num_blocks=64), 2, hkv, d, "cpu", torch.float32)
    # Scramble the free list so block tables are not contiguous.
    perm = torch.randperm(64, generator=gen).tolist()
    pool.blocks._free.clear()
    pool.blocks._free.extend(perm)
    seqs = [pool.new_sequence() for _ in range(3)]
    history = {s: ([], [], []) for s in seqs}  # all q, k, v per sequence, in order

    def check(feeds, layer):
        q, k, v, out = run_step(pool, layer, seqs, feeds, gen, hq, hkv, d)
        offset = 0
        for seq, count in zip(seqs, feeds):
            hk = history[seq]
            hk[1].append(k[offset : offset + count])
            hk[2].append(v[offset : offset + count])
            all_k, all_v = torch.cat(hk[1]), torch.cat(hk[2])
            expected = dense_attention(q[offset : offset + count], all_k, all_v, all_k.shape[0] - count)
            torch.testing.assert_close(out[offset : offset + count], expected, atol=1e-5, rtol=1e-5)
            offset += count

    check([3, 4, 9], layer=1)  # varlen prefill: shorter than, equal to, longer than a block
    for _ in range(3):
        check([1, 1, 1], layer=1)  # batched decode
    check([2, 1, 5], layer=1)  # new tokens on top of a cached prefix


def test_attend_writes_only_its_own_layer():
    d, gen = 4, torch.Generator().manual_seed(1)
    pool = KVPool(KVConfig(block_size=2, num_blocks=8), 2, 1, d, "cpu", torch.float32)
    seq = pool.new_sequence()
    run_step(pool, 0, [seq], [3], gen, 1, 1, d)
    layer1_before = pool.key_cache[1].clone()
    assert torch.count_nonzero(layer1_before) == 0
    assert torch.count_nonzero(pool.key_cache[0]) == 3 * d


def test_padding_never_enters_the_cache():
    d, gen = 4, torch.Generator().manual_seed(2)
    pool = KVPool(KVConfig(block_size=4, num_blocks=8), 1, 1, d, "cpu", torch.float32)
    a, b = pool.new_sequence(), pool.new_sequence()
    _, k, _, _ = run_step(pool, 0, [a, b], [1, 6], gen, 1, 1, d)
    flat = pool.key_cache[0].view(-1, 1, d)
    written = torch.count_nonzero(flat.abs().sum(dim=(1, 2)))
    assert written == 7  # exactly the 7 new tokens, nothing for the padded query rows
    assert torch.equal(flat[pool.block_table(b)[0] * 4 + 2], k[3])


def test_backend_selection_on_cpu():
    assert select_backend("auto", "cpu", 16) == "torch"
    assert select_backend("torch", "cpu", 16) == "torch"
    with pytest.raises(ValueError, match="kv.attention = 'flash' cannot run: it needs a CUDA device"):
        select_backend("flash", "cpu", 256)
    with pytest.raises(ValueError, match="kv.attention = 'bogus'"):
        select_backend("bogus", "cpu", 16)
