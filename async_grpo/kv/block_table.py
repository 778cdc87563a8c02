"""Block bookkeeping of the paged KV pool: a plain data structure with no tensors in it.

The pool's memory is `num_blocks` blocks of `block_size` token slots. This module decides which
block holds which token of which sequence; `kv/pool.py` owns the tensors and applies the few
copies this module asks for (the tail block of a fork).

- A free list and a reference count per block. A block is free exactly when its count is 0.
- A block table per sequence: the blocks holding its tokens 0, 1, ... in order. Token `p` of a
  sequence lives in slot `table[p // block_size] * block_size + p % block_size` of the flattened pool.
- `fork(seq, n)`: the n samples of a prompt share every full block (count += n - 1); the partial
  last block, which the samples will write into, is copied once per new sample (copy-on-write at the
  boundary). A prompt that ends on a block boundary needs no copy at all.
- Writes only ever go to blocks with count 1, so a shared block is never modified.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


class PoolExhausted(RuntimeError):
    """More blocks were asked for than are free; the scheduler's admission control prevents this."""


@dataclass(frozen=True, slots=True)
class BlockCopy:
    """Copy the first `num_tokens` slots of block `src` into block `dst` (a fork's private tail)."""

    src: int
    dst: int
    num_tokens: int


class BlockTable:
    """Free list, reference counts and per-sequence block tables of one pool."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks = {num_blocks}: expected at least 1")
        if block_size < 1:
            raise ValueError(f"block_size = {block_size}: expected at least 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_count = [0] * num_blocks
        # Filled slots per block, so `tokens_held` counts a shared block's tokens once.
        self._fill = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._next_seq = 0
        self._tokens_held = 0
        self.peak_blocks_in_use = 0

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def tokens_held(self) -> int:
        return self._tokens_held

    def ref_count(self, block: int) -> int:
        return self._ref_count[block]

    def table(self, seq: int) -> list[int]:
        return self._tables[self._check(seq)]

    def length(self, seq: int) -> int:
        """Tokens of `seq` whose K/V are in the pool."""
        return self._lengths[self._check(seq)]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def sequences(self) -> list[int]:
        return list(self._tables)

    # ---- mutations -------------------------------------------------------------------------

    def new_sequence(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        self._tables[seq] = []
        self._lengths[seq] = 0
        return seq

    def append_slots(self, seq: int, num_tokens: int) -> list[int]:
        """Reserve slots for the next `num_tokens` tokens of `seq`; return their flat slot indices."""
        table = self._tables[self._check(seq)]
        start = self._lengths[seq]
        end = start + num_tokens
        need = self.blocks_for(end) - len(table)
        if need > len(self._free):
            raise PoolExhausted(
                f"sequence {seq} needs {need} more blocks for {num_tokens} tokens, "
                f"but only {len(self._free)} of {self.num_blocks} are free"
            )
        if start % self.block_size and self._ref_count[table[-1]] != 1:
            raise AssertionError(f"sequence {seq} would write into shared block {table[-1]}")
        for _ in range(need):
            table.append(self._take())
        bs = self.block_size
        slots = [table[p // bs] * bs + p % bs for p in range(start, end)]
        for p in range(start, end):
            self._fill[table[p // bs]] += 1
        self._lengths[seq] = end
        self._tokens_held += num_tokens
        return slots

    def fork(self, seq: int, n: int) -> tuple[list[int], list[BlockCopy]]:
        """Split `seq` into n sequences with the same tokens: `seq` itself plus n - 1 new ones.

        Returns the n sequence ids (`seq` first) and the tail copies the pool must apply.
        """
        if n < 1:
            raise ValueError(f"fork of sequence {seq} into n = {n}: expected n >= 1")
        table = self._tables[self._check(seq)]
        length = self._lengths[seq]
        tail_tokens = length % self.block_size
        full = table[:-1] if tail_tokens else list(table)
        copies_needed = (n - 1) if tail_tokens else 0
        if copies_needed > len(self._free):
            raise PoolExhausted(
                f"fork of sequence {seq} into {n} needs {copies_needed} tail blocks, "
                f"but only {len(self._free)} are free"
            )
        for block in full:
            self._ref_count[block] += n - 1
        ids = [seq]
        copies: list[BlockCopy] = []
        for _ in range(n - 1):
            child = self.new_sequence()
            child_table = list(full)
            if tail_tokens:
                dst = self._take()
                self._fill[dst] = tail_tokens
                self._tokens_held += tail_tokens
                copies.append(BlockCopy(src=table[-1], dst=dst, num_tokens=tail_tokens))
                child_table.append(dst)
            self._tables[child] = child_table
            self._lengths[child] = length
            ids.append(child)
        return ids, copies

    def free(self, seq: int) -> None:
        """Drop `seq`; its blocks return to the free list once no other sequence holds them."""
        table = self._tables.pop(self._check(seq))
        del self._lengths[seq]
        for block in table:
            self._ref_count[block] -= 1
            if self._ref_count[block] == 0:
                self._tokens_held -= self._fill[block]
                self._fill[block] = 0
                self._free.append(block)

    def reset(self) -> None:
        """Free every block and forget every sequence (the K/V no longer match the weights)."""
        self._free = deque(range(self.num_blocks))
        self._ref_count = [0] * self.num_blocks
        self._fill = [0] * self.num_blocks
        self._tables.clear()
        self._lengths.clear()
        self._tokens_held = 0

    # ---- internals -------------------------------------------------------------------------

    def _take(self) -> int:
        block = self._free.popleft()
        self._ref_count[block] = 1
        in_use = self.num_blocks - len(self._free)
        if in_use > self.peak_blocks_in_use:
            self.peak_blocks_in_use = in_use
        return block

    def _check(self, seq: int) -> int:
        if seq not in self._tables:
            raise KeyError(f"sequence {seq} is not in the pool (freed, invalidated or never created)")
        return seq
