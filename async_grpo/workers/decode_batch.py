"""The live decode batch, kept on the device and updated with tensor ops: no per-sequence work per step.

Every live sample that only has its last sampled token uncached is one row of the batch. Rows
`[0, num_rows)` are live, in admission order; the buffers have room for `capacity` rows:

    block_tables int32 [capacity, max_blocks]   the row's pool blocks in order
    positions    int64 [capacity]               position of the token the row feeds next; -1: no row
    last_tokens  int64 [capacity]               the token the row feeds next

A decode step reads them through `StepMetadata.for_decode` (slot mapping and context lengths
computed on the device), samples, and `advance` writes the sampled tokens and bumps the positions
in place. The host mirrors only what it needs for bookkeeping, as numpy arrays (`lens`, the history
slot of each row), so per-step host work is a few vectorised numpy ops.

Blocks are taken from the pool only when a row crosses into a new block (every `block_size` steps):
`grow_blocks` claims a whole block's slots from the pool for each such row (`KVPool.append_slots`;
the pool's length for the sequence therefore runs ahead of what is written, up to the end of its
last block) and patches the device tables with one small upload. On joining, a row claims the rest
of its partly filled tail block the same way. Blocks are held exactly as if they were taken token
by token, so admission's worst-case reservation and the peak block count are unchanged.

Finished rows are dropped by `remove`, which compacts the survivors in order with one gather and
marks the vacated rows as padding (position -1) for CUDA-graph buckets larger than the batch.

For the shared-prefix decode kernel the batch also keeps how its rows group by prompt
(workers/prefix_groups.py): recomputed when rows join or leave, uploaded before the step that uses it.
"""

from __future__ import annotations

import numpy as np
import torch

from async_grpo.kv.pool import KVPool
from async_grpo.kv.step_metadata import PrefixGroups, StepMetadata
from async_grpo.workers.prefix_groups import PrefixGroupBuffers
from async_grpo.workers.sequence import Sequence


class DecodeBatch:
    def __init__(self, pool: KVPool, max_blocks_per_seq: int, capacity: int, device: torch.device | str):
        if max_blocks_per_seq < 1 or capacity < 1:
            raise ValueError(
                f"max_blocks_per_seq = {max_blocks_per_seq}, capacity = {capacity}: expected both at least 1"
            )
        self.pool = pool
        self.block_size = pool.block_size
        self.max_blocks = max_blocks_per_seq
        self.device = torch.device(device)
        self.seqs: list[Sequence] = []
        self.lens = np.zeros(0, dtype=np.int64)  # [R] tokens cached = position fed next
        self.slots = np.zeros(0, dtype=np.int64)  # [R] each row's TokenHistory slot
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity
        self.block_tables = torch.zeros(
            capacity, self.max_blocks, dtype=torch.int32, device=self.device
        )  # [capacity, max_blocks]
        self.positions = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)  # [capacity]
        self.last_tokens = torch.zeros(capacity, dtype=torch.int64, device=self.device)  # [capacity]
        self.prefix_buffers = PrefixGroupBuffers(capacity, self.max_blocks, self.block_size, self.device)

    @property
    def num_rows(self) -> int:
        return len(self.seqs)

    def max_context_len(self) -> int:
        """Longest context of this step's rows once their new token is written (host side, no sync)."""
        return int(self.lens.max()) + 1 if self.lens.size else 0

    def reserve(self, rows: int) -> bool:
        """Make room for `rows` rows; only while the batch is empty. True if the buffers were reallocated
        (anything captured against the old ones, such as CUDA graphs, must be captured again)."""
        if rows <= self.capacity:
            return False
        if self.num_rows:
            raise RuntimeError(f"cannot grow a decode batch holding {self.num_rows} live rows")
        self._allocate(rows)
        return True

    def add(self, seqs: list[Sequence], last_tokens: np.ndarray) -> None:
        """Append rows for samples whose pool K/V cover all but their last token `last_tokens[i]`."""
        k = len(seqs)
        if last_tokens.shape != (k,):
            raise ValueError(f"last_tokens of shape {last_tokens.shape}: expected ({k},), one per sample")
        if k == 0:
            return
        r = self.num_rows
        if r + k > self.capacity:
            raise RuntimeError(
                f"decode batch of capacity {self.capacity} cannot take {k} more rows beside {r}: reserve() first"
            )
        bs = self.block_size
        packed = np.zeros((k, 2 + self.max_blocks), dtype=np.int64)  # [k, position | token | table]
        lens = np.empty(k, dtype=np.int64)
        for i, seq in enumerate(seqs):
            assert seq.kv is not None, "a decode row needs its K/V in the pool"
            cached = self.pool.seq_len(seq.kv)
            table = self.pool.block_table(seq.kv)
            if len(table) > self.max_blocks:
                raise ValueError(f"sequence holds {len(table)} blocks; decode rows hold at most {self.max_blocks}")
            room = -cached % bs
            if room:
                self.pool.append_slots(seq.kv, room)  # the rest of its own tail block: no new block
            lens[i] = cached
            packed[i, 2 : 2 + len(table)] = table
        packed[:, 0] = lens
        packed[:, 1] = last_tokens
        dev = torch.from_numpy(packed).to(self.device)  # one upload for all new rows
        self.positions[r : r + k] = dev[:, 0]
        self.last_tokens[r : r + k] = dev[:, 1]
        self.block_tables[r : r + k] = dev[:, 2:].to(torch.int32)
        self.seqs.extend(seqs)
        self.prefix_buffers.rows_changed()
        self.lens = np.concatenate([self.lens, lens])
        self.slots = np.concatenate([self.slots, np.fromiter((s.slot for s in seqs), dtype=np.int64, count=k)])

    def grow_blocks(self) -> int:
        """Give a new block to every row about to write the first token of one; returns how many rows got one."""
        crossing = np.flatnonzero(self.lens % self.block_size == 0)
        if crossing.size == 0:
            return 0
        bs = self.block_size
        cols = self.lens[crossing] // bs
        if int(cols.max()) >= self.max_blocks:
            raise ValueError(f"a decode row needs block {int(cols.max())}; rows hold at most {self.max_blocks}")
        blocks = np.empty_like(crossing)
        for i, row in enumerate(crossing.tolist()):
            kv = self.seqs[row].kv
            self.pool.append_slots(kv, bs)
            blocks[i] = self.pool.block_table(kv)[-1]
        patch = torch.from_numpy(np.stack([crossing, cols, blocks])).to(self.device)  # [3, n]
        self.block_tables[patch[0], patch[1]] = patch[2].to(torch.int32)
        return int(crossing.size)

    def metadata(self, rows: int, max_context_len: int, prefix_groups: PrefixGroups | None = None) -> StepMetadata:
        """The step's attention metadata over the first `rows` rows (rows past num_rows are padding),
        with the shared-prefix split when `prefix_groups` (from `prefix_groups`) is given."""
        return StepMetadata.for_decode(
            self.block_tables[:rows], self.positions[:rows], self.block_size, max_context_len, prefix_groups
        )

    def shares_prefix(self, min_rows: int) -> bool:
        """Whether some group has at least `min_rows` live rows and at least one shared full prompt block."""
        return self.prefix_buffers.largest_sharing_group(self.seqs) >= min_rows

    def refresh_prefix_groups(self, rows: int | None, max_group_rows: int) -> None:
        """Upload the rows' grouping by prompt for a step of `rows` rows (None: any), if it changed."""
        self.prefix_buffers.refresh(self.seqs, self.block_tables, rows, max_group_rows)

    def prefix_groups(self, rows: int, slots: int, max_group_rows: int) -> PrefixGroups:
        """The uploaded grouping of rows [0, rows) in `slots` group slots (see workers/prefix_groups.py)."""
        return self.prefix_buffers.view(rows, slots, max_group_rows)

    def advance(self, tokens: torch.Tensor) -> None:
        """Every row fed its token and sampled `tokens` [R]: that is what each feeds next, one position on."""
        r = self.num_rows
        self.last_tokens[:r].copy_(tokens)
        self.positions[:r] += 1
        self.lens += 1

    def remove(self, finished: np.ndarray) -> None:
        """Drop the rows flagged in `finished` [R]; the rest keep their order."""
        r = self.num_rows
        if finished.shape != (r,):
            raise ValueError(f"finished mask of shape {finished.shape}: expected ({r},)")
        keep = np.flatnonzero(~finished)
        k = int(keep.size)
        if k == r:
            return
        if k:
            idx = torch.from_numpy(keep).to(self.device)  # [k]
            self.block_tables[:k] = self.block_tables.index_select(0, idx)
            self.positions[:k] = self.positions.index_select(0, idx)
            self.last_tokens[:k] = self.last_tokens.index_select(0, idx)
        self.positions[k:r] = -1
        self.seqs = [self.seqs[i] for i in keep.tolist()]
        self.prefix_buffers.rows_changed()
        self.lens = self.lens[keep]
        self.slots = self.slots[keep]

    def clear(self) -> None:
        """Drop every row (weights changed, the generation was aborted, or a new one starts)."""
        self.positions.fill_(-1)
        self.seqs = []
        self.prefix_buffers.rows_changed()
        self.lens = np.zeros(0, dtype=np.int64)
        self.slots = np.zeros(0, dtype=np.int64)
