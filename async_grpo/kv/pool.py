"""The paged KV pool of one rollout worker rank: the K/V tensors plus their block bookkeeping.

Layout (fixed; the attention backends read it in place):
    key_cache[layer], value_cache[layer]: [num_blocks, block_size, num_kv_heads_local, head_dim]
Both are views into one allocation `[2, num_layers, num_blocks, block_size, kv_heads, head_dim]`
made once at start, so a fork's tail copy is one indexed copy across all layers and K and V.

Sized from `KVConfig`: `num_blocks` when given, else as many blocks as fit `memory_gb` GiB of K and V
for all layers. Which block holds which token is decided by `BlockTable` (kv/block_table.py).
`invalidate()` frees every block; the engine calls it whenever the weights change, since K/V computed
under the old weights must never be read again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from async_grpo.config import KVConfig
from async_grpo.kv.block_table import BlockTable

_GIB = 1024**3


@dataclass(frozen=True, slots=True)
class KVPoolStats:
    num_blocks: int
    block_size: int
    blocks_in_use: int
    peak_blocks_in_use: int
    tokens_held: int


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V of one block across all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def num_blocks_for(cfg: KVConfig, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """The pool size `cfg` asks for: `num_blocks` if set, else what fits in `memory_gb` GiB."""
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    per_block = bytes_per_block(num_layers, cfg.block_size, num_kv_heads, head_dim, dtype)
    blocks = int(cfg.memory_gb * _GIB) // per_block
    if blocks < 1:
        raise ValueError(
            f"kv.memory_gb = {cfg.memory_gb} holds no block: one block of {cfg.block_size} tokens needs "
            f"{per_block} bytes; raise kv.memory_gb or set kv.num_blocks"
        )
    return blocks


class KVPool:
    """K/V tensors of every layer plus the block table that addresses them."""

    def __init__(
        self,
        cfg: KVConfig,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ):
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.num_blocks = num_blocks_for(cfg, num_layers, num_kv_heads, head_dim, dtype)
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.device = torch.device(device)
        self.dtype = dtype
        # [2 (K, V), num_layers, num_blocks, block_size, num_kv_heads, head_dim]
        self._storage = torch.zeros(
            2, num_layers, self.num_blocks, self.block_size, num_kv_heads, head_dim, device=self.device, dtype=dtype
        )
        self.key_cache = list(self._storage[0].unbind(0))
        self.value_cache = list(self._storage[1].unbind(0))
        self.blocks = BlockTable(self.num_blocks, self.block_size)

    # Sequence lifetime -------------------------------------------------------------------

    def new_sequence(self) -> int:
        return self.blocks.new_sequence()

    def append_slots(self, seq: int, num_tokens: int) -> list[int]:
        """Flat slot indices (`block * block_size + offset`) for the next `num_tokens` tokens of `seq`."""
        return self.blocks.append_slots(seq, num_tokens)

    def fork(self, seq: int, n: int) -> list[int]:
        """n sequences holding `seq`'s tokens (`seq` first): full blocks shared, the tail copied."""
        ids, copies = self.blocks.fork(seq, n)
        if copies:
            src = torch.tensor([c.src for c in copies], device=self.device)
            dst = torch.tensor([c.dst for c in copies], device=self.device)
            # Whole blocks are copied: the slots past the tail are garbage either way and never read.
            self._storage[:, :, dst] = self._storage[:, :, src]
        return ids

    def free(self, seq: int) -> None:
        self.blocks.free(seq)

    def invalidate(self) -> None:
        """Free every block: after a weight update no cached K/V may be read again."""
        self.blocks.reset()

    # Queries -----------------------------------------------------------------------------

    def block_table(self, seq: int) -> list[int]:
        return self.blocks.table(seq)

    def seq_len(self, seq: int) -> int:
        return self.blocks.length(seq)

    def stats(self) -> KVPoolStats:
        return KVPoolStats(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            blocks_in_use=self.blocks.blocks_in_use,
            peak_blocks_in_use=self.blocks.peak_blocks_in_use,
            tokens_held=self.blocks.tokens_held,
        )

    def reset_peak(self) -> None:
        self.blocks.peak_blocks_in_use = self.blocks.blocks_in_use
