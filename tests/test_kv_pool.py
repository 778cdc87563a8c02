"""The KV pool's tensors: sizing from KVConfig, the fork's tail copy, invalidation."""

import pytest
import torch

from async_grpo.config import KVConfig
from async_grpo.kv.pool import KVPool, bytes_per_block


def test_pool_is_sized_from_memory_budget():
    # 2 (K,V) * 3 layers * 8 tokens * 2 heads * 4 dims * 4 bytes = 1536 bytes per block
    assert bytes_per_block(3, 8, 2, 4, torch.float32) == 1536
    cfg = KVConfig(block_size=8, memory_gb=1536 * 10 / 1024**3)
    pool = KVPool(cfg, num_layers=3, num_kv_heads=2, head_dim=4, device="cpu", dtype=torch.float32)
    assert pool.num_blocks == 10
    assert pool.key_cache[0].shape == (10, 8, 2, 4)
    assert len(pool.key_cache) == len(pool.value_cache) == 3


def test_num_blocks_wins_over_memory_budget():
    pool = KVPool(KVConfig(block_size=4, num_blocks=7), 1, 1, 2, "cpu", torch.bfloat16)
    assert pool.num_blocks == 7
    assert pool.value_cache[0].dtype == torch.bfloat16


def test_budget_too_small_for_one_block_is_a_clear_error():
    with pytest.raises(ValueError, match="kv.memory_gb = 1e-09 holds no block"):
        KVPool(KVConfig(block_size=16, memory_gb=1e-9), 2, 2, 64, "cpu", torch.float32)


def test_fork_copies_tail_contents_for_every_layer_and_shares_full_blocks():
    pool = KVPool(KVConfig(block_size=4, num_blocks=8), 2, 1, 2, "cpu", torch.float32)
    seq = pool.new_sequence()
    slots = pool.append_slots(seq, 6)
    for layer in range(2):
        values = torch.arange(6, dtype=torch.float32)[:, None, None].expand(6, 1, 2) + 100 * layer
        pool.key_cache[layer].view(-1, 1, 2)[slots] = values
        pool.value_cache[layer].view(-1, 1, 2)[slots] = -values
    a, b = pool.fork(seq, 2)
    assert a == seq
    tail_a, tail_b = pool.block_table(a)[1], pool.block_table(b)[1]
    assert pool.block_table(a)[0] == pool.block_table(b)[0]
    assert tail_a != tail_b
    for layer in range(2):
        assert torch.equal(pool.key_cache[layer][tail_b, :2], pool.key_cache[layer][tail_a, :2])
        assert torch.equal(pool.value_cache[layer][tail_b, :2], pool.value_cache[layer][tail_a, :2])
        assert pool.key_cache[layer][tail_b, 1, 0, 0].item() == 5 + 100 * layer


def test_invalidate_frees_all_blocks_and_stats_count_shared_tokens_once():
    pool = KVPool(KVConfig(block_size=4, num_blocks=8), 1, 1, 2, "cpu", torch.float32)
    seq = pool.new_sequence()
    pool.append_slots(seq, 9)
    pool.fork(seq, 3)
    stats = pool.stats()
    assert (stats.blocks_in_use, stats.tokens_held) == (5, 8 + 3 * 1)
    pool.invalidate()
    stats = pool.stats()
    assert (stats.blocks_in_use, stats.tokens_held, stats.peak_blocks_in_use) == (0, 0, 5)
    assert pool.blocks.sequences() == []
