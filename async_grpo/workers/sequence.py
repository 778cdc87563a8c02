"""The rollout engine's units of work: one prompt's group of samples, each sample, and its result.

A `SequenceGroup` is one prompt and its n samples. Its prompt is prefilled once into the KV pool
(`prompt_kv`), then forked into the samples, each a `Sequence` with its own pool handle. After a
weight update the pool is emptied and the group is prefilled again the same way (`needs_prefill`),
its live samples re-fed their generated tokens: the same block layout as before, so the same
memory bound holds.

A finished sample becomes a `Completion`, the engine's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

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
    """One sample of a group: the prompt plus the tokens generated so far."""

    group: "SequenceGroup"
    sample: int
    token_ids: list[int]
    policy_version: int
    logprobs: list[float] = field(default_factory=list)
    kv: int | None = None  # pool handle; None while the pool holds none of its tokens
    finish_reason: FinishReason | None = None

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.group.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_completion(self) -> Completion:
        assert self.finish_reason is not None, "only a finished sequence has a completion"
        prompt_len = len(self.group.prompt_ids)
        return Completion(
            token_ids=self.token_ids[prompt_len:],
            logprobs=list(self.logprobs),
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
