"""Group-relative advantages: the only credit assignment GRPO has.

A rollout worker samples G completions per prompt (one *group*), scores them, and turns the G rewards
into advantages before the trajectories leave the worker, because only the worker holds whole groups
(the learner's data-parallel ranks each see an arbitrary slice; pooling across them was a bug of the
seed). Both the workers and the tests call this module; it depends on torch alone.

For a group with rewards r_1..r_G (population statistics, ddof = 0):

    mean = (1/G) sum_j r_j
    std  = sqrt((1/G) sum_j (r_j - mean)^2)
    A_i  = (r_i - mean) / (std + eps)      std_normalize = True   (GRPO, DeepSeekMath)
    A_i  =  r_i - mean                     std_normalize = False  (Dr.GRPO: no difficulty bias)

A group whose rewards are all equal has A_i = 0 for every member, so it adds no policy gradient, only
noise in the token normaliser. DAPO's dynamic sampling drops such groups (`filter_zero_variance`);
`compute_advantages` then returns a keep mask and the caller does not send those trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from async_grpo.config import AdvantageConfig


@dataclass(frozen=True)
class GroupAdvantages:
    """Advantages of a batch of completions and which of them to keep (False: zero-variance group)."""

    advantages: torch.Tensor  # [N] fp32
    keep: torch.Tensor  # [N] bool


def _as_1d(name: str, values: torch.Tensor | Sequence[float] | Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=dtype)
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be one value per completion (1-D), got shape {tuple(tensor.shape)}")
    return tensor


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense group index [N] in 0..num_groups-1 (order of first appearance is irrelevant here)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0


def group_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_ids: torch.Tensor | Sequence[int],
    std_normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantage of each completion relative to its own group (formulas in the module docstring).

    rewards: [N] one scalar per completion; group_ids: [N] completions with equal ids form a group
    (groups may have different sizes and need not be contiguous). Returns [N] fp32.
    """
    r = _as_1d("rewards", rewards, torch.float64)  # [N]; float64 so hand-computed tests match exactly
    g = _as_1d("group_ids", group_ids, torch.int64)  # [N]
    if r.shape != g.shape:
        raise ValueError(f"rewards has {r.numel()} values but group_ids has {g.numel()}; expected one id per reward")
    if eps < 0:
        raise ValueError(f"eps = {eps!r}: expected a value >= 0")
    if not torch.isfinite(r).all():
        bad = r[~torch.isfinite(r)][0].item()
        raise ValueError(f"reward {bad!r} is not finite; reward functions must return finite numbers")
    index, num_groups = _group_index(g)
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, index, torch.ones_like(r))  # [num_groups]
    mean = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, index, r) / count  # [num_groups]
    centred = r - mean[index]  # [N]
    if not std_normalize:
        return centred.float()
    var = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, index, centred * centred) / count
    denominator = var.sqrt()[index] + eps  # [N]
    # A zero-variance group is all zeros already; with eps = 0 keep it 0 rather than 0/0.
    return torch.where(denominator > 0, centred / denominator, torch.zeros_like(centred)).float()


def zero_variance_mask(
    rewards: torch.Tensor | Sequence[float], group_ids: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """[N] bool: True for completions whose group has at least two distinct rewards (DAPO keeps these)."""
    r = _as_1d("rewards", rewards, torch.float64)
    g = _as_1d("group_ids", group_ids, torch.int64)
    if r.shape != g.shape:
        raise ValueError(f"rewards has {r.numel()} values but group_ids has {g.numel()}; expected one id per reward")
    index, num_groups = _group_index(g)
    # Exact comparison on purpose: rewards that differ at all carry a learning signal.
    low = torch.full((num_groups,), float("inf"), dtype=torch.float64).scatter_reduce(0, index, r, "amin")
    high = torch.full((num_groups,), float("-inf"), dtype=torch.float64).scatter_reduce(0, index, r, "amax")
    return (high > low)[index]


def compute_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_ids: torch.Tensor | Sequence[int],
    cfg: AdvantageConfig,
) -> GroupAdvantages:
    """Advantages as configured (`std_normalize`, `eps`) plus the keep mask (`filter_zero_variance`)."""
    advantages = group_advantages(rewards, group_ids, std_normalize=cfg.std_normalize, eps=cfg.eps)
    if cfg.filter_zero_variance:
        keep = zero_variance_mask(rewards, group_ids)
    else:
        keep = torch.ones_like(advantages, dtype=torch.bool)
    return GroupAdvantages(advantages=advantages, keep=keep)
