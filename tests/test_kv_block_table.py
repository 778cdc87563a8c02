"""Block bookkeeping of the KV pool: slots, fork (shared full blocks, copied tail), ref counts, freeing."""

import pytest

from async_grpo.kv.block_table import BlockCopy, BlockTable, PoolExhausted


def test_append_slots_maps_positions_to_block_offsets():
    table = BlockTable(num_blocks=8, block_size=4)
    seq = table.new_sequence()
    assert table.append_slots(seq, 6) == [0, 1, 2, 3, 4, 5]  # blocks 0 and 1, in order
    other = table.new_sequence()
    assert table.append_slots(other, 1) == [8]  # block 2, offset 0
    assert table.append_slots(seq, 3) == [6, 7, 12]  # fills block 1, then takes block 3
    assert table.table(seq) == [0, 1, 3]
    assert table.length(seq) == 9
    assert table.blocks_in_use == 4
    assert table.tokens_held == 10


def test_fork_shares_full_blocks_and_copies_tail():
    table = BlockTable(num_blocks=16, block_size=4)
    seq = table.new_sequence()
    table.append_slots(seq, 10)  # blocks 0, 1 full; block 2 holds 2 tokens
    ids, copies = table.fork(seq, 3)
    assert ids[0] == seq and len(ids) == 3
    assert [table.ref_count(b) for b in (0, 1, 2)] == [3, 3, 1]
    assert copies == [BlockCopy(src=2, dst=3, num_tokens=2), BlockCopy(src=2, dst=4, num_tokens=2)]
    assert table.table(ids[1]) == [0, 1, 3]
    assert table.table(ids[2]) == [0, 1, 4]
    assert all(table.length(i) == 10 for i in ids)
    assert table.blocks_in_use == 5  # 2 shared + 3 tails
    assert table.tokens_held == 8 + 3 * 2
    # Each sample writes its next token into its own tail block.
    assert table.append_slots(ids[1], 1) == [3 * 4 + 2]
    assert table.append_slots(seq, 1) == [2 * 4 + 2]


def test_fork_on_block_boundary_copies_nothing():
    table = BlockTable(num_blocks=16, block_size=4)
    seq = table.new_sequence()
    table.append_slots(seq, 8)
    ids, copies = table.fork(seq, 4)
    assert copies == []
    assert [table.ref_count(b) for b in (0, 1)] == [4, 4]
    assert table.blocks_in_use == 2
    # The first new token of each sample opens a private block.
    new_slots = [table.append_slots(i, 1)[0] for i in ids]
    assert new_slots == [8, 12, 16, 20]
    assert table.blocks_in_use == 6


def test_free_returns_shared_blocks_only_with_the_last_holder():
    table = BlockTable(num_blocks=8, block_size=4)
    seq = table.new_sequence()
    table.append_slots(seq, 6)
    ids, _ = table.fork(seq, 2)
    assert table.blocks_in_use == 3
    table.free(ids[0])
    assert table.blocks_in_use == 2  # its tail went back; the shared block stays
    assert table.ref_count(0) == 1
    table.free(ids[1])
    assert table.blocks_in_use == 0
    assert table.num_free_blocks == 8
    assert table.tokens_held == 0
    assert table.peak_blocks_in_use == 3
    with pytest.raises(KeyError, match="sequence 0 is not in the pool"):
        table.length(ids[0])


def test_reset_frees_everything_and_keeps_peak():
    table = BlockTable(num_blocks=8, block_size=2)
    for _ in range(3):
        table.append_slots(table.new_sequence(), 3)
    assert table.blocks_in_use == 6
    table.reset()
    assert table.blocks_in_use == 0 and table.tokens_held == 0 and table.sequences() == []
    assert table.peak_blocks_in_use == 6


def test_exhaustion_is_a_clear_error_and_changes_nothing():
    table = BlockTable(num_blocks=2, block_size=4)
    seq = table.new_sequence()
    table.append_slots(seq, 5)
    with pytest.raises(PoolExhausted, match="needs 1 more blocks for 4 tokens, but only 0 of 2 are free"):
        table.append_slots(seq, 4)
    assert table.length(seq) == 5
    with pytest.raises(PoolExhausted, match="needs 2 tail blocks"):
        table.fork(seq, 3)
    assert table.ref_count(0) == 1


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_blocks = 0"):
        BlockTable(0, 4)
    with pytest.raises(ValueError, match="n = 0"):
        t = BlockTable(2, 4)
        t.fork(t.new_sequence(), 0)
