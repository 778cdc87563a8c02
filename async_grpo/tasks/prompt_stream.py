"""A sharded, per-epoch-shuffled, resumable stream of prompts over any indexable prompt source.

Epoch `e` visits the source in the order `permutation(len(source))` drawn from a generator seeded by
`(seed, e)`; shard `r` of `k` takes every k-th entry of that order starting at `r`. So within an epoch
the shards partition the source (no prompt is taken twice, none is skipped), every epoch has a fresh
order, and the order depends only on the seed, never on timing. The whole position is two integers
(epoch, offset), which `state_dict()` returns for checkpoints and `load_state_dict()` restores.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Protocol

import numpy as np

from async_grpo.tasks.base import PromptItem


class PromptSource(Protocol):
    """A finite, indexable set of prompts; `item(i)` is deterministic."""

    def __len__(self) -> int: ...

    def item(self, index: int) -> PromptItem: ...


_STATE_KEYS = ("seed", "shard_rank", "shard_count", "num_prompts", "epoch", "offset")


class PromptStream(Iterator[PromptItem]):
    """Endless iterator over one shard of a prompt source, epoch after epoch."""

    def __init__(self, source: PromptSource, seed: int, shard_rank: int = 0, shard_count: int = 1):
        num_prompts = len(source)
        if shard_count < 1:
            raise ValueError(f"shard_count={shard_count}: expected at least 1")
        if not 0 <= shard_rank < shard_count:
            raise ValueError(f"shard_rank={shard_rank}: expected 0 <= shard_rank < shard_count={shard_count}")
        if num_prompts < shard_count:
            raise ValueError(
                f"the prompt source has {num_prompts} prompts: expected at least one per shard "
                f"(shard_count={shard_count})"
            )
        self.source = source
        self.seed, self.shard_rank, self.shard_count = int(seed), shard_rank, shard_count
        self.num_prompts = num_prompts
        self.epoch = 0
        self.offset = 0  # prompts of this epoch's shard already handed out
        self._order_epoch = -1
        self._order: np.ndarray = np.empty(0, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Source indices this shard takes in `epoch`, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_prompts)  # [num_prompts]
        return order[self.shard_rank :: self.shard_count]  # [~num_prompts / shard_count]

    def _current_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = self.epoch_order(self.epoch)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> "PromptStream":
        return self

    def __next__(self) -> PromptItem:
        order = self._current_order()
        if self.offset >= len(order):
            self.epoch += 1
            self.offset = 0
            order = self._current_order()
        index = int(order[self.offset])
        self.offset += 1
        return self.source.item(index)

    def take(self, n: int) -> list[PromptItem]:
        """The next `n` prompts (crossing epoch boundaries as needed)."""
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "shard_rank": self.shard_rank,
            "shard_count": self.shard_count,
            "num_prompts": self.num_prompts,
            "epoch": self.epoch,
            "offset": self.offset,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume at a saved position. The stream must be over the same source, seed and sharding."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"prompt stream state {dict(state)!r} lacks keys {missing}: expected {list(_STATE_KEYS)}")
        mine = self.state_dict()
        for key in ("seed", "shard_rank", "shard_count", "num_prompts"):
            if int(state[key]) != mine[key]:
                raise ValueError(
                    f"prompt stream state has {key}={state[key]!r} but this stream has {key}={mine[key]!r}: "
                    "a position can only be resumed with the same prompts, seed and sharding"
                )
        epoch, offset = int(state["epoch"]), int(state["offset"])
        shard_len = len(range(self.shard_rank, self.num_prompts, self.shard_count))
        if epoch < 0 or not 0 <= offset <= shard_len:
            raise ValueError(
                f"prompt stream state has epoch={epoch}, offset={offset}: expected epoch >= 0 and "
                f"0 <= offset <= {shard_len} (this shard's prompts per epoch)"
            )
        self.epoch, self.offset = epoch, offset
