"""One rollout sample as it travels from a rollout worker to the learner.

A `Trajectory` is one completion of one prompt: the token ids, the behaviour logprobs the worker
sampled them with (fp32, after every sampling transform), the reward, the group-relative advantage
and the bookkeeping the learner needs (group, policy version for staleness, finish reason, worker).
The worker builds it straight from the engine's output: token lists or tensors are taken as they
are (no copy when they already have the right dtype on the CPU), and the G samples of one prompt
may share one `prompt_ids` tensor, which the codec then sends once per message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence, Union, get_args

import numpy as np
import torch

FinishReason = Literal["stop", "length", "abort"]
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)

TokenLike = Union[torch.Tensor, np.ndarray, Sequence[int]]
FloatsLike = Union[torch.Tensor, np.ndarray, Sequence[float]]


def _as_cpu_vector(values: TokenLike | FloatsLike, dtype: torch.dtype, name: str) -> torch.Tensor:
    """A contiguous 1-D CPU tensor of `dtype`; `values` itself when it already is one.

    Returning the same object matters: the codec sends a prompt tensor shared by a group once.
    """
    if isinstance(values, torch.Tensor):
        tensor = values.detach() if values.requires_grad else values
        if tensor.device.type != "cpu" or tensor.dtype != dtype:
            tensor = tensor.to(device="cpu", dtype=dtype)
    else:
        tensor = torch.as_tensor(values, dtype=dtype)
    if tensor.dim() != 1:
        raise ValueError(f"Trajectory.{name} has shape {tuple(tensor.shape)}: expected a 1-D sequence")
    return tensor.contiguous()


@dataclass(slots=True)
class Trajectory:
    """One completion with everything the learner's loss and bookkeeping need."""

    prompt_ids: torch.Tensor  # [P] int32
    completion_ids: torch.Tensor  # [C] int32
    behaviour_logprobs: torch.Tensor  # [C] float32: logprob of each completion token when sampled
    reward: float
    advantage: float
    group_id: int
    sample_index: int  # position of this sample within its group (0..G-1)
    policy_version: int  # weights version that generated it
    finish_reason: FinishReason
    worker_id: int
    extra: dict[str, float] = field(default_factory=dict)  # optional per-sample metrics

    def __post_init__(self) -> None:
        self.prompt_ids = _as_cpu_vector(self.prompt_ids, torch.int32, "prompt_ids")
        self.completion_ids = _as_cpu_vector(self.completion_ids, torch.int32, "completion_ids")
        self.behaviour_logprobs = _as_cpu_vector(self.behaviour_logprobs, torch.float32, "behaviour_logprobs")
        if self.behaviour_logprobs.numel() != self.completion_ids.numel():
            raise ValueError(
                f"Trajectory.behaviour_logprobs has {self.behaviour_logprobs.numel()} values but completion_ids "
                f"has {self.completion_ids.numel()} tokens: expected one logprob per completion token"
            )
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"Trajectory.finish_reason = {self.finish_reason!r}: expected one of {FINISH_REASONS}")
        self.reward = float(self.reward)
        self.advantage = float(self.advantage)
        # Caught here, at the worker, rather than as a rejected message at the learner.
        for name, value in (("reward", self.reward), ("advantage", self.advantage), *self.extra.items()):
            if not isinstance(name, str) or not math.isfinite(value):
                raise ValueError(f"Trajectory {name!r} = {value!r}: expected a finite number under a string name")

    @property
    def num_tokens(self) -> int:
        """Prompt plus completion length: what the learner's token budget counts."""
        return self.prompt_ids.numel() + self.completion_ids.numel()
