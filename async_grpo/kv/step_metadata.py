"""What one forward step of the rollout engine tells the attention backend about its sequences.

A step feeds each of B sequences its tokens that are not cached yet (a whole prompt at prefill, one
token at decode, the tokens generated so far after a weight update), flattened into T tokens with
no padding, sequence after sequence. Built once per step on the host and moved to the device in one
go; every layer's `attend` reads the same metadata.

Shapes: slot_mapping int64 [T]; block_tables int32 [B, max_blocks]; context_lens int32 [B] (tokens
cached once this step's K/V are written); query_lens int32 [B]; cu_query_lens int32 [B + 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
