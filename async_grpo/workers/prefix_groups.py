"""Which decode rows share a prompt prefix, kept in static device buffers for the shared-prefix kernel.

The n samples of a prompt are forked from its prefill, so they share its full prompt blocks
(`len(prompt) // block_size` of them) and own the rest of their blocks. The shared-prefix decode
kernel (kv/shared_prefix.py) reads each group's shared blocks once for all its rows; this module
tells it which rows form a group, as `PrefixGroups` (kv/step_metadata.py):

- groups are numbered 0, 1, ... in the order of their first row; `order` lists the rows group by
  group; slot g holds group g's first index in `order`, its row count, its prefix length and its
  prefix block table (the first row's table: its first blocks are the shared ones);
- padding rows of a graph bucket (rows past the live ones) form extra groups of at most
  `max_group_rows` rows with an empty prefix, so their output is defined (zero) instead of read
  from partials nobody wrote; slots past the groups have count 0 and do nothing.

The grouping changes only when rows join or leave the batch, so it is computed on the host then
(`rows_changed` marks it stale) and uploaded in one copy, with one gather for the prefix tables,
before the step that needs it (`refresh`): never per layer, never inside a captured CUDA graph.
A captured graph reads the buffers in place: its group-slot count is fixed per bucket
(`group_slots`), and the kernel's programs for empty slots exit at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from async_grpo.kv.step_metadata import PrefixGroups
from async_grpo.workers.sequence import Sequence, SequenceGroup

# Rows of the uploaded buffer: two per decode row, four per group slot.
_ORDER, _ROW_PREFIX_BLOCKS, _STARTS, _COUNTS, _PREFIX_LENS, _FIRST_ROW = range(6)


def group_slots(rows: int, num_prompts: int, group_size: int) -> int:
    """Group slots for a step of `rows` rows (live and padding): enough for every grouping it can have.

    At most `num_prompts` live groups, plus ceil(padding / group_size) padding groups, and never more
    groups than rows. A bound fixed by the bucket and the call, so a captured graph keeps its grid.
    """
    if min(rows, num_prompts, group_size) < 1:
        raise ValueError(f"rows = {rows}, num_prompts = {num_prompts}, group_size = {group_size}: expected >= 1")
    return min(rows, num_prompts + -(-rows // group_size))


@dataclass(frozen=True, slots=True)
class _HostGrouping:
    """The live rows by prompt group, on the host."""

    group: np.ndarray  # [R] int64: each row's group, numbered in the order of first rows
    row_blocks: np.ndarray  # [R] int64: full prompt blocks each row shares with its group
    counts: np.ndarray  # [Ng] int64: live rows per group
    first_row: np.ndarray  # [Ng] int64: each group's first row
    group_blocks: np.ndarray  # [Ng] int64: shared full blocks per group
    largest_sharing: int  # live rows of the largest group with at least one shared block


class PrefixGroupBuffers:
    """Static device buffers of a decode batch's grouping by shared prompt prefix."""

    def __init__(self, capacity: int, max_blocks: int, block_size: int, device: torch.device):
        self.capacity = capacity
        self.block_size = block_size
        # order | row_prefix_blocks (per row), starts | counts | prefix_lens | first_row (per group slot).
        self.buffer = torch.zeros(6, capacity, dtype=torch.int32, device=device)  # [6, capacity]
        self.prefix_block_tables = torch.zeros(capacity, max_blocks, dtype=torch.int32, device=device)  # [cap, W]
        self._host: _HostGrouping | None = None
        self._uploaded: tuple[int | None, int] | None = None  # (rows, max_group_rows) of the last upload
        self._num_groups_used = 0  # live and padding groups of the last upload

    def rows_changed(self) -> None:
        """Rows joined or left the batch: the grouping must be recomputed before its next use."""
        self._host = None
        self._uploaded = None

    def largest_sharing_group(self, seqs: list[Sequence]) -> int:
        """Live rows of the largest group that shares at least one full prompt block (0 if none)."""
        return self._grouping(seqs).largest_sharing

    def refresh(
        self, seqs: list[Sequence], block_tables: torch.Tensor, rows: int | None, max_group_rows: int
    ) -> None:
        """Upload the grouping of the live `seqs` (rows [0, len(seqs)) of `block_tables`), if stale.

        `rows`: the step's row count, whose rows past the live ones become padding groups; None
        makes no padding groups (then every slot past the live groups is empty, which is safe for
        any row count: what graph capture needs). No device sync; call it outside graph capture.
        """
        if self._uploaded == (rows, max_group_rows):
            return
        host = self._grouping(seqs)
        live, cap = len(seqs), self.capacity
        largest = int(host.counts.max()) if host.counts.size else 0
        if largest > max_group_rows:
            raise ValueError(f"a group has {largest} live rows, more than max_group_rows = {max_group_rows}")
        total = live if rows is None else rows
        if not live <= total <= cap:
            raise ValueError(f"rows = {rows}: expected between the {live} live rows and the capacity {cap}")
        pad_starts = np.arange(live, total, max_group_rows)  # [Np] first row of each padding group
        pad_counts = np.minimum(max_group_rows, total - pad_starts)
        ng = host.counts.size
        used = ng + pad_starts.size
        buf = np.zeros((6, cap), dtype=np.int32)
        buf[_ORDER, :live] = np.argsort(host.group, kind="stable")
        buf[_ORDER, live:] = np.arange(live, cap)
        buf[_ROW_PREFIX_BLOCKS, :live] = host.row_blocks
        buf[_STARTS, :ng] = np.cumsum(host.counts) - host.counts
        buf[_STARTS, ng:used] = pad_starts
        buf[_COUNTS, :ng] = host.counts
        buf[_COUNTS, ng:used] = pad_counts
        buf[_PREFIX_LENS, :ng] = host.group_blocks * self.block_size
        buf[_FIRST_ROW, :ng] = host.first_row
        self.buffer.copy_(torch.from_numpy(buf), non_blocking=True)
        if ng:
            # A group's prefix table is its first row's table: the shared blocks come first in every row.
            first = self.buffer[_FIRST_ROW, :ng].long()  # [Ng]
            self.prefix_block_tables[:ng] = block_tables.index_select(0, first)
        self._num_groups_used = used
        self._uploaded = (rows, max_group_rows)

    def view(self, rows: int, slots: int, max_group_rows: int) -> PrefixGroups:
        """The uploaded grouping for a step of `rows` rows and `slots` group slots."""
        if self._uploaded is None or self._uploaded[1] != max_group_rows or self._uploaded[0] not in (None, rows):
            raise RuntimeError(
                f"prefix groups were last uploaded for (rows, max_group_rows) = {self._uploaded}, not for "
                f"({rows}, {max_group_rows}): refresh first"
            )
        if self._num_groups_used > slots or slots > rows:
            raise ValueError(f"{slots} group slots for {rows} rows: expected {self._num_groups_used}..{rows}")
        return PrefixGroups(
            order=self.buffer[_ORDER, :rows],
            row_prefix_blocks=self.buffer[_ROW_PREFIX_BLOCKS, :rows],
            starts=self.buffer[_STARTS, :slots],
            counts=self.buffer[_COUNTS, :slots],
            prefix_lens=self.buffer[_PREFIX_LENS, :slots],
            prefix_block_tables=self.prefix_block_tables[:slots],
            max_live=max_group_rows,
        )

    def _grouping(self, seqs: list[Sequence]) -> _HostGrouping:
        if self._host is None:
            index: dict[SequenceGroup, int] = {}
            r = len(seqs)
            group = np.fromiter((index.setdefault(s.group, len(index)) for s in seqs), np.int64, r)
            row_blocks = np.fromiter((len(s.group.prompt_ids) // self.block_size for s in seqs), np.int64, r)
            counts = np.bincount(group, minlength=len(index))  # [Ng]
            first_row = np.unique(group, return_index=True)[1]  # [Ng]
            group_blocks = np.zeros(len(index), dtype=np.int64)
            group_blocks[group] = row_blocks
            sharing = counts[group_blocks > 0]
            self._host = _HostGrouping(
                group=group,
                row_blocks=row_blocks,
                counts=counts,
                first_row=first_row,
                group_blocks=group_blocks,
                largest_sharing=int(sharing.max()) if sharing.size else 0,
            )
        return self._host
