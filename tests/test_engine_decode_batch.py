"""The device-side decode batch: block tables grow at block boundaries, slots computed on the device, rows compact."""

import numpy as np
import pytest
import torch

from async_grpo.config import KVConfig, ModelConfig, SamplingConfig
from async_grpo.kv.pool import KVPool
from async_grpo.kv.step_metadata import StepMetadata
from async_grpo.model import build_model
from async_grpo.workers.decode_batch import DecodeBatch
from async_grpo.workers.engine import GenerationEngine
from async_grpo.workers.sequence import Sequence, SequenceGroup
from async_grpo.workers.token_history import TokenHistory

BS = 4
MAX_BLOCKS = 8


def forked_samples(pool: KVPool, history: TokenHistory, prompt_len: int, n: int, first_token: int) -> list[Sequence]:
    """A prompt prefilled into the pool and forked into n samples that each sampled `first_token`."""
    group = SequenceGroup(index=prompt_len, prompt_ids=list(range(prompt_len)), n=n)
    kv = pool.new_sequence()
    pool.append_slots(kv, prompt_len)
    seqs = []
    for i, handle in enumerate(pool.fork(kv, n)):
        seq = Sequence(group, i, 0, history, history.open(), kv=handle)
        history.append(np.array([seq.slot]), np.array([first_token]), np.array([-0.5], dtype=np.float32))
        group.samples.append(seq)
        seqs.append(seq)
    return seqs


@pytest.fixture
def batch_of_six():
    """Prompts of 3, 4 and 6 tokens (tail 3, no tail, tail 2), two samples each: rows at positions 3,3,4,4,6,6."""
    pool = KVPool(KVConfig(block_size=BS, num_blocks=40), num_layers=1, num_kv_heads=1, head_dim=2,
                  device="cpu", dtype=torch.float32)
    history = TokenHistory(max_new_tokens=16)
    batch = DecodeBatch(pool, MAX_BLOCKS, capacity=8, device="cpu")
    seqs = []
    for prompt_len, token in ((3, 10), (4, 11), (6, 12)):
        seqs += forked_samples(pool, history, prompt_len, 2, token)
    batch.add(seqs, history.last_tokens(np.array([s.slot for s in seqs])))
    return pool, batch, seqs


def host_slots(pool: KVPool, seq: Sequence, position: int) -> int:
    table = pool.block_table(seq.kv)
    return table[position // BS] * BS + position % BS


def test_rows_join_with_their_pool_tables_and_positions(batch_of_six):
    pool, batch, seqs = batch_of_six
    assert batch.num_rows == 6
    assert batch.lens.tolist() == [3, 3, 4, 4, 6, 6]
    assert batch.positions[:6].tolist() == [3, 3, 4, 4, 6, 6]
    assert batch.positions[6:].tolist() == [-1, -1]
    assert batch.last_tokens[:6].tolist() == [10, 10, 11, 11, 12, 12]
    for row, seq in enumerate(seqs):
        table = pool.block_table(seq.kv)
        assert batch.block_tables[row, : len(table)].tolist() == table
    # P=3: two private tails; P=4: one shared full block; P=6: one shared block + two tails.
    assert pool.stats().blocks_in_use == 2 + 1 + 3


def test_block_tables_grow_only_when_a_row_crosses_a_block_boundary(batch_of_six):
    pool, batch, seqs = batch_of_six
    grown, in_use = [], []
    for step in range(6):
        grown.append(batch.grow_blocks())
        in_use.append(pool.stats().blocks_in_use)
        for row, seq in enumerate(seqs):
            table = pool.block_table(seq.kv)
            assert batch.block_tables[row, : len(table)].tolist() == table
            assert len(table) == batch.lens[row] // BS + 1  # exactly the blocks up to the one written now
        batch.advance(torch.arange(6) + 100 * step)
    # Positions 3,3,4,4,6,6 then +1 per step: rows at a multiple of 4 take a block (P=4 at steps 0 and 4,
    # P=3 at step 1 and 5, P=6 at step 2).
    assert grown == [2, 2, 2, 0, 2, 2]
    assert in_use == [8, 10, 12, 12, 14, 16]
    assert batch.positions[:6].tolist() == [9, 9, 10, 10, 12, 12]
    assert batch.last_tokens[:6].tolist() == [500, 501, 502, 503, 504, 505]


def test_slot_mapping_on_the_device_equals_the_host_computation(batch_of_six):
    pool, batch, seqs = batch_of_six
    for _ in range(3):
        batch.grow_blocks()
        meta = batch.metadata(8, batch.max_context_len())  # a bucket of 8 over 6 live rows
        expected = [host_slots(pool, seq, int(p)) for seq, p in zip(seqs, batch.lens)]
        assert meta.slot_mapping.tolist() == expected + [-1, -1]  # padding rows store nothing
        assert meta.context_lens.tolist() == [int(p) + 1 for p in batch.lens] + [0, 0]
        assert meta.context_lens.dtype == torch.int32 and meta.slot_mapping.dtype == torch.int64
        assert meta.is_decode and meta.num_seqs == 8
        assert meta.max_context_len == int(batch.lens.max()) + 1
        batch.advance(torch.zeros(6, dtype=torch.long))


def test_finished_rows_are_removed_and_the_rest_keep_their_order(batch_of_six):
    pool, batch, seqs = batch_of_six
    batch.grow_blocks()
    before_tables = batch.block_tables[:6].clone()
    batch.advance(torch.tensor([20, 21, 22, 23, 24, 25]))
    batch.remove(np.array([False, True, False, False, True, False]))
    assert batch.num_rows == 4
    assert batch.seqs == [seqs[0], seqs[2], seqs[3], seqs[5]]
    assert batch.lens.tolist() == [4, 5, 5, 7]
    assert batch.slots.tolist() == [seqs[i].slot for i in (0, 2, 3, 5)]
    assert batch.positions.tolist() == [4, 5, 5, 7, -1, -1, -1, -1]  # vacated rows are padding again
    assert batch.last_tokens[:4].tolist() == [20, 22, 23, 25]
    assert torch.equal(batch.block_tables[:4], before_tables[[0, 2, 3, 5]])
    batch.remove(np.zeros(4, dtype=bool))  # nothing finished: nothing moves
    assert batch.num_rows == 4
    batch.remove(np.ones(4, dtype=bool))
    assert batch.num_rows == 0 and batch.positions.tolist() == [-1] * 8


def test_batch_refuses_more_rows_than_its_capacity(batch_of_six):
    pool, batch, _ = batch_of_six
    history = TokenHistory(4)
    extra = forked_samples(pool, history, 5, 3, 7)
    with pytest.raises(RuntimeError, match="capacity 8 cannot take 3 more rows beside 6"):
        batch.add(extra, np.array([7, 7, 7]))
    with pytest.raises(RuntimeError, match="cannot grow a decode batch holding 6 live rows"):
        batch.reserve(16)
    batch.clear()
    assert batch.reserve(16) and batch.capacity == 16 and batch.positions.tolist() == [-1] * 16
    assert not batch.reserve(9)


def test_decode_metadata_rejects_wrong_dtypes():
    with pytest.raises(ValueError, match=r"block_tables has shape \(2, 3\) dtype torch.int64: expected int32"):
        StepMetadata.for_decode(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), 4, 8)
    with pytest.raises(ValueError, match=r"positions has shape \(3,\) dtype torch.int64: expected int64 \[2\]"):
        StepMetadata.for_decode(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(3, dtype=torch.long), 4, 8)


def test_engine_claims_pool_slots_only_at_prefill_join_and_block_boundaries(monkeypatch):
    model = build_model(ModelConfig(preset="tiny", init_seed=0), "cpu", torch.float32).eval()
    engine = GenerationEngine(model, KVConfig(block_size=BS, num_blocks=32), "cpu", torch.float32)
    calls = []
    original = engine.pool.append_slots

    def counting(seq, num_tokens):
        calls.append(num_tokens)
        return original(seq, num_tokens)

    monkeypatch.setattr(engine.pool, "append_slots", counting)
    engine.generate([[1, 2, 3, 4, 5]], 2, SamplingConfig(temperature=0, max_new_tokens=8, ignore_eos=True))
    # Prefill claims the 5 prompt slots; each of the 2 samples claims the 3 free slots of its tail block on
    # joining; feeding positions 5..11, each crosses into a new block once (position 8) and claims all 4 slots.
    assert calls == [5, 3, 3, 4, 4]
    stats = engine.last_stats
    assert (stats.steps, stats.decode_steps, stats.graph_steps) == (8, 7, 0)
    assert stats.peak_blocks_in_use == 1 + 2 * 2  # shared prompt block + two own blocks per sample
    assert engine.decode_batch.num_rows == 0 and engine.pool.stats().blocks_in_use == 0


def test_eos_mid_batch_removes_rows_and_matches_single_prompt_runs():
    model = build_model(ModelConfig(preset="tiny", init_seed=2), "cpu", torch.float32).eval()
    engine = GenerationEngine(model, KVConfig(block_size=BS, num_blocks=64), "cpu", torch.float32)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]
    free = engine.generate(prompts, 1, SamplingConfig(temperature=0, max_new_tokens=10, ignore_eos=True))
    stop = free[1][0].token_ids[3]  # fires in prompt 1's fourth token, maybe earlier elsewhere
    params = SamplingConfig(temperature=0, max_new_tokens=10, ignore_eos=True, stop_token_ids=[stop])
    together = engine.generate(prompts, 2, params)
    for i, prompt in enumerate(prompts):
        alone = engine.generate([prompt], 1, params)[0][0]
        for c in together[i]:
            assert (c.token_ids, c.finish_reason) == (alone.token_ids, alone.finish_reason)
        cut = free[i][0].token_ids
        expected = cut[: cut.index(stop) + 1] if stop in cut else cut
        assert together[i][0].token_ids == expected
    assert together[1][0].finish_reason == "stop" and len(together[1][0].token_ids) <= 4
    assert engine.pool.stats().blocks_in_use == 0
