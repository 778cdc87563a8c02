"""The rollout engine's units of work: one prompt's group of samples, each sample, and its result.

A `SequenceGroup` is one prompt and its n samples. Its prompt is prefilled once into the KV pool
(`prompt_kv`), then forked into the samples, each a `Sequence` with its own pool handle. After a
weight update the pool is emptied and the group is prefilled again the same way (`needs_prefill`),
its live samples re-fed their generated tokens: the same block layout as before, so the same
memory bound holds.

While a sample is live, its generated tokens and logprobs live in a `TokenHistory` slot shared by
all samples of the call (one vectorised append per step); a finished sample keeps them as lists and
becomes a `Completion`, the engine's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from async_grpo.workers.token_history import TokenHistory

FinishReason = Literal["stop", "length", "abort"]


@dataclass(slots=True)
class Completion:
    """One sampled completion: its tokens, the fp32 behaviour logprob of each, why it ended, and the
    policy version of the weights that produced it (the oldest, if the weights changed mid-sequence)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    policy_version: int

    def logprobs_tensor(self) -> torch.Tensor:
        return torch.tensor(self.logprobs, dtype=torch.float32)  # [len(token_ids)]


@dataclass(slots=True, eq=False)
class Sequence:
    """One sample of a group: the prompt plus the tokens generated so far.

    While the sample is live its tokens and logprobs sit in slot `slot` of the step's shared
    `TokenHistory` (appended for all rows at once); `finish` turns them into its own lists.
    """

    group: "SequenceGroup"
    sample: int
    policy_version: int
    history: TokenHistory
    slot: int
    kv: int | None = None  # pool handle; None while the pool holds none of its tokens
    finish_reason: FinishReason | None = None
    _final_tokens: list[int] | None = None
    _final_logprobs: list[float] | None = None

    @property
    def generated_ids(self) -> list[int]:
        if self._final_tokens is not None:
            return self._final_tokens
        return self.history.generated(self.slot)

    @property
    def token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens (a new list)."""
        return self.group.prompt_ids + self.generated_ids

    @property
    def num_generated(self) -> int:
        if self._final_tokens is not None:
            return len(self._final_tokens)
        return int(self.history.counts[self.slot])

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: FinishReason) -> None:
        """End the sample: its tokens and logprobs leave the shared history for its own lists."""
        if self.finish_reason is not None:
            raise AssertionError(f"sample {self.sample} of prompt {self.group.index} finished twice")
        self.finish_reason = reason
        self._final_tokens, self._final_logprobs = self.history.take(self.slot)

    def to_completion(self) -> Completion:
        assert self._final_tokens is not None and self._final_logprobs is not None and self.finish_reason is not None, (
            "only a finished sequence has a completion"
        )
        return Completion(
            token_ids=list(self._final_tokens),
            logprobs=list(self._final_logprobs),
            finish_reason=self.finish_reason,
            policy_version=self.policy_version,
        )


@dataclass(slots=True, eq=False)
class SequenceGroup:
    """One prompt and its n samples (empty until the prompt's first forward step)."""

    index: int
    prompt_ids: list[int]
    n: int
    samples: list[Sequence] = field(default_factory=list)
    prompt_kv: int | None = None  # pool handle of the prompt between its prefill and the fork
    needs_prefill: bool = True

    def live(self) -> list[Sequence]:
        return [s for s in self.samples if not s.finished]

    @property
    def finished(self) -> bool:
        return bool(self.samples) and all(s.finished for s in self.samples)
