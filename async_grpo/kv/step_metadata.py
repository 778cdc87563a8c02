"""What one forward step of the rollout engine tells the attention backend about its sequences.

A step feeds each of B sequences its tokens that are not cached yet (a whole prompt at prefill, one
token at decode, the tokens generated so far after a weight update), flattened into T tokens with
no padding, sequence after sequence. Every layer's `attend` reads the same metadata.

Two ways to make it:
- `build`: from per-sequence host lists, moved to the device in one go (prefill steps, and the
  catch-up step after a weight update, where sequences feed several tokens);
- `for_decode`: one token per row, computed on the device from the decode batch's block tables and
  positions with fixed shapes and no host sync, so it can run inside a captured CUDA graph. A row
  with position -1 is padding (a graph bucket larger than the live batch): slot -1, which the fused
  kernels skip, and context 0, which attends to nothing.

Shapes: slot_mapping int64 [T]; block_tables int32 [B, max_blocks]; context_lens int32 [B] (tokens
cached once this step's K/V are written); query_lens int32 [B]; cu_query_lens int32 [B + 1].

A decode step may also carry `shared_prefix` (kv/shared_prefix.py's cascade kernel): the samples of
one prompt share its full prompt blocks, so each row's context is split into its group's shared
prefix (read once per group) and the row's own suffix. `PrefixGroups` says how rows group (built by
the decode batch from host lists whenever its rows change); `for_decode` derives each row's suffix
block table and length from it on the device, with fixed shapes, so the split stays capturable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class PrefixGroups:
    """How the B rows of a decode step group by shared prompt prefix, as the cascade kernel reads it.

    S group slots (fixed per graph bucket): slot g holds a group's first index in `order`, its row
    count, its shared prefix length and block table; unused slots have count 0. Every live row is in
    one group; padding rows are too (groups with an empty prefix, so their output is defined) except
    in the layout graph capture reads, which has no groups at all.
    """

    order: torch.Tensor  # int32 [B]: rows, group by group
    row_prefix_blocks: torch.Tensor  # int32 [B]: shared full blocks of each row's group
    starts: torch.Tensor  # int32 [S]: first index of group g in `order`
    counts: torch.Tensor  # int32 [S]: rows in group g (0: an unused slot)
    prefix_lens: torch.Tensor  # int32 [S]: tokens in group g's shared full blocks
    prefix_block_tables: torch.Tensor  # int32 [S, max_blocks]: group g's blocks (the shared ones first)
    # Bound on any count (host side): sizes the kernel's row tiles, fixed for a captured graph.
    max_live: int

    @property
    def num_rows(self) -> int:
        return self.order.shape[0]


@dataclass(frozen=True, slots=True)
class SharedPrefixMetadata:
    """A decode step's context split into each group's shared prefix and each row's own suffix."""

    groups: PrefixGroups
    suffix_block_tables: torch.Tensor  # int32 [B, max_blocks]: row b's blocks after its group's prefix
    suffix_lens: torch.Tensor  # int32 [B]: row b's tokens after the prefix, the new one included


@dataclass(frozen=True, slots=True)
class StepMetadata:
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_lens: torch.Tensor
    cu_query_lens: torch.Tensor
    block_size: int
    # Host copies of the maxima, so kernels never read them back from the device.
    max_query_len: int
    max_context_len: int
    # Decode steps only: the shared-prefix split of every row's context (None: plain paged attention).
    shared_prefix: SharedPrefixMetadata | None = None

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

    @property
    def is_decode(self) -> bool:
        """Every sequence feeds exactly one token (the fused decode kernels' case)."""
        return self.max_query_len == 1

    @classmethod
    def build(
        cls,
        slots: list[list[int]],
        tables: list[list[int]],
        context_lens: list[int],
        block_size: int,
        device: torch.device,
    ) -> "StepMetadata":
        """From per-sequence host lists: new tokens' slots, block tables and cached lengths after the step."""
        if not (len(slots) == len(tables) == len(context_lens)) or not slots:
            raise ValueError(
                f"step metadata needs one entry per sequence and at least one sequence; got {len(slots)} slot lists, "
                f"{len(tables)} block tables, {len(context_lens)} context lengths"
            )
        query_lens = [len(s) for s in slots]
        if min(query_lens) < 1:
            raise ValueError(f"every sequence of a step feeds at least one token; query lengths {query_lens}")
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        flat_slots = [s for seq_slots in slots for s in seq_slots]
        # One host tensor per dtype, one transfer each.
        ints32 = torch.tensor(
            [x for row in padded for x in row] + context_lens + query_lens + cu, dtype=torch.int32
        ).to(device, non_blocking=True)
        b = len(slots)
        nt = b * width
        return cls(
            slot_mapping=torch.tensor(flat_slots, dtype=torch.int64).to(device, non_blocking=True),  # [T]
            block_tables=ints32[:nt].view(b, width),  # [B, max_blocks]
            context_lens=ints32[nt : nt + b],  # [B]
            query_lens=ints32[nt + b : nt + 2 * b],  # [B]
            cu_query_lens=ints32[nt + 2 * b :],  # [B + 1]
            block_size=block_size,
            max_query_len=max(query_lens),
            max_context_len=max(context_lens),
        )

    @classmethod
    def for_decode(
        cls,
        block_tables: torch.Tensor,
        positions: torch.Tensor,
        block_size: int,
        max_context_len: int,
        prefix_groups: PrefixGroups | None = None,
    ) -> "StepMetadata":
        """Decode metadata on the device: row b feeds the token at `positions[b]`.

        block_tables int32 [B, max_blocks] (a row's blocks in order, already holding the block of its
        position); positions int64 [B], -1 for a padding row. `max_context_len` is a host-side bound
        on the rows' context lengths (the torch and flash backends size their work by it). Padding
        rows are for the fused Triton kernels only: the torch reference needs every row valid.
        With `prefix_groups` (B rows) the metadata also carries the shared-prefix split of every row.
        """
        if block_tables.dim() != 2 or block_tables.dtype != torch.int32:
            raise ValueError(
                f"block_tables has shape {tuple(block_tables.shape)} dtype {block_tables.dtype}: "
                "expected int32 [rows, max_blocks]"
            )
        if positions.shape != (block_tables.shape[0],) or positions.dtype != torch.int64:
            raise ValueError(
                f"positions has shape {tuple(positions.shape)} dtype {positions.dtype}: "
                f"expected int64 [{block_tables.shape[0]}]"
            )
        rows = positions.shape[0]
        dev = positions.device
        valid = positions >= 0  # [B]
        pos = positions.clamp_min(0)  # [B]
        block = block_tables.gather(1, (pos // block_size).unsqueeze(1)).squeeze(1).long()  # [B]
        slots = torch.where(valid, block * block_size + pos % block_size, -1)  # [B]
        context = torch.where(valid, pos + 1, 0).to(torch.int32)  # [B]
        shared = None
        if prefix_groups is not None:
            shared = _split_at_prefix(block_tables, pos, valid, block_size, prefix_groups)
        return cls(
            slot_mapping=slots,
            block_tables=block_tables,
            context_lens=context,
            query_lens=torch.ones(rows, dtype=torch.int32, device=dev),  # [B]
            cu_query_lens=torch.arange(rows + 1, dtype=torch.int32, device=dev),  # [B + 1]
            block_size=block_size,
            max_query_len=1,
            max_context_len=max_context_len,
            shared_prefix=shared,
        )


def _split_at_prefix(
    block_tables: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, block_size: int, groups: PrefixGroups
) -> SharedPrefixMetadata:
    """Each row's own blocks and tokens after its group's shared prefix, by device ops of fixed shape."""
    rows, width = block_tables.shape
    if groups.num_rows != rows or groups.row_prefix_blocks.dtype != torch.int32:
        raise ValueError(
            f"prefix groups cover {groups.num_rows} rows ({groups.row_prefix_blocks.dtype}): "
            f"expected int32 buffers of the step's {rows} rows"
        )
    own_first = groups.row_prefix_blocks.long()  # [B]
    # Shifted past the table's end, columns repeat its last one: like unused columns, beyond suffix_lens, never read.
    cols = (own_first.unsqueeze(1) + torch.arange(width, device=pos.device)).clamp_max(width - 1)  # [B, W]
    suffix_tables = block_tables.gather(1, cols)  # [B, W]
    suffix_lens = torch.where(valid, pos + 1 - own_first * block_size, 0).to(torch.int32)  # [B]
    return SharedPrefixMetadata(groups=groups, suffix_block_tables=suffix_tables, suffix_lens=suffix_lens)
