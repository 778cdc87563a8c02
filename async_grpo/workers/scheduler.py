"""Admission and step planning for the rollout engine: which groups enter the pool, what each step feeds.

Admission reserves each group's worst case up front, so a running generation can never run out of
blocks: for a prompt of P tokens, n samples and at most M new tokens, with block size b,

    shared     = P // b                            full prompt blocks, held once for the group
    per_sample = ceil((P + M - 1) / b) - shared    a sample's tail copy and completion blocks
    worst      = shared + n * per_sample

(the last sampled token is never fed back, so a sample caches at most P + M - 1 tokens). Groups are
admitted in order while the reservations of the admitted ones fit the pool; the rest wait. A sample
that finishes returns its share at once. A group whose worst case exceeds the whole pool can never
run: that is a ValueError before any work starts.

A step is one of three kinds:
- prefill: the prompts of newly admitted groups and of groups whose K/V were dropped by a weight
  update, each prompt once (`next_step` returns it);
- catch-up: right after a re-prefill, the forked samples that hold more than one uncached token (all
  they generated so far) feed them in one varlen step (`next_step` returns it);
- decode: otherwise (`next_step` returns None). Every live sample is then a row of the engine's
  device-side decode batch and feeds its one uncached token; the scheduler is not consulted per row.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from async_grpo.kv.pool import KVPool
from async_grpo.workers.sequence import Sequence, SequenceGroup


@dataclass(frozen=True, slots=True)
class StepEntry:
    """One sequence of a step: pool handle `kv` is fed `tokens`; `seq` is None for a prompt prefill."""

    kv: int
    tokens: list[int]
    group: SequenceGroup
    seq: Sequence | None


@dataclass(frozen=True, slots=True)
class StepPlan:
    entries: list[StepEntry]
    is_prefill: bool


class Scheduler:
    def __init__(self, pool: KVPool, groups: list[SequenceGroup], max_new_tokens: int):
        self.pool = pool
        self.max_new_tokens = max_new_tokens
        self._waiting: deque[SequenceGroup] = deque(groups)
        self._admitted: list[SequenceGroup] = []
        self._catch_up: list[Sequence] = []  # forked samples with more than their last token uncached
        self._reserved = 0
        for group in groups:
            worst = self.worst_case_blocks(group)
            if worst > pool.num_blocks:
                raise ValueError(
                    f"prompt {group.index} ({len(group.prompt_ids)} tokens, n = {group.n}, max_new_tokens = "
                    f"{max_new_tokens}) needs up to {worst} KV blocks of {pool.block_size} tokens, but the pool "
                    f"has {pool.num_blocks}; raise kv.num_blocks / kv.memory_gb or lower n or max_new_tokens"
                )

    # ---- block budget ------------------------------------------------------------------------

    def _shared_blocks(self, group: SequenceGroup) -> int:
        return len(group.prompt_ids) // self.pool.block_size

    def _per_sample_blocks(self, group: SequenceGroup) -> int:
        most_cached = len(group.prompt_ids) + self.max_new_tokens - 1
        return -(-most_cached // self.pool.block_size) - self._shared_blocks(group)

    def worst_case_blocks(self, group: SequenceGroup) -> int:
        return self._shared_blocks(group) + group.n * self._per_sample_blocks(group)

    @property
    def reserved_blocks(self) -> int:
        return self._reserved

    # ---- state -------------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._admitted)

    def live_sequences(self) -> list[Sequence]:
        return [s for g in self._admitted for s in g.live()]

    def next_step(self) -> StepPlan | None:
        """The next prefill or catch-up step, or None: then every live sample is ready to decode."""
        prefill = [g for g in self._admitted if g.needs_prefill]
        while self._waiting and self._reserved + self.worst_case_blocks(self._waiting[0]) <= self.pool.num_blocks:
            group = self._waiting.popleft()
            self._reserved += self.worst_case_blocks(group)
            self._admitted.append(group)
            prefill.append(group)
        if prefill:
            entries = []
            for group in prefill:
                group.prompt_kv = self.pool.new_sequence()
                group.needs_prefill = False
                entries.append(StepEntry(group.prompt_kv, list(group.prompt_ids), group, None))
            return StepPlan(entries, is_prefill=True)
        entries = []
        for seq in self._catch_up:
            if seq.finished:
                continue
            assert seq.kv is not None, "a forked sample always has its K/V in the pool"
            cached = self.pool.seq_len(seq.kv)
            entries.append(StepEntry(seq.kv, seq.token_ids[cached:], seq.group, seq))
        self._catch_up.clear()
        return StepPlan(entries, is_prefill=False) if entries else None

    # ---- transitions -------------------------------------------------------------------------

    def fork_prompt(self, group: SequenceGroup) -> list[Sequence]:
        """Share the prefilled prompt with the group's live samples (copy-on-write tail).

        Returns the samples ready to decode (only their last token uncached); the others, re-prefilled
        after a weight update with several tokens of their own to feed, wait for the catch-up step.
        """
        live = group.live()
        assert group.prompt_kv is not None
        ready = []
        if live:
            for seq, handle in zip(live, self.pool.fork(group.prompt_kv, len(live))):
                seq.kv = handle
                uncached = len(group.prompt_ids) + seq.num_generated - self.pool.seq_len(handle)
                (ready if uncached == 1 else self._catch_up).append(seq)
        else:
            self.pool.free(group.prompt_kv)
        group.prompt_kv = None
        self._retire_if_done(group)
        return ready

    def release(self, seq: Sequence) -> None:
        """A sample finished: its blocks and its share of the group's reservation return at once."""
        if seq.kv is not None:
            self.pool.free(seq.kv)
            seq.kv = None
        self._reserved -= self._per_sample_blocks(seq.group)
        self._retire_if_done(seq.group)

    def _retire_if_done(self, group: SequenceGroup) -> None:
        if group.finished and group.prompt_kv is None and group in self._admitted:
            self._admitted.remove(group)
            self._reserved -= self._shared_blocks(group)

    def invalidate(self) -> None:
        """Drop every cached K/V (new weights); admitted groups are prefilled again on the next step."""
        self.pool.invalidate()
        self._catch_up.clear()
        for group in self._admitted:
            group.prompt_kv = None
            group.needs_prefill = True
            for seq in group.samples:
                seq.kv = None

    def abort_all(self) -> list[Sequence]:
        """End every unfinished sample now (the tensor-parallel peers left the loop); returns them."""
        aborted = []
        for group in list(self._admitted) + list(self._waiting):
            if not group.samples:
                continue
            for seq in group.live():
                seq.finish("abort")
                aborted.append(seq)
                if seq.kv is not None:
                    self.pool.free(seq.kv)
                    seq.kv = None
        self._waiting.clear()
        self._admitted.clear()
        self._catch_up.clear()
        self.pool.invalidate()
        self._reserved = 0
        return aborted
