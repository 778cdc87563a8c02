"""Trajectories -> right-padded micro-batches, balanced across learner ranks.

A learner step consumes `samples_per_step` trajectories. They are dealt to the learner ranks by
longest-processing-time first (longest sequence to the rank with the fewest tokens so far; ties to
the lower rank), so every rank does about the same work and every rank computes the same deal from
the same list. Each rank packs its share into micro-batches of at most `micro_batch_tokens` padded
tokens (B * S, the real memory cost), longest first. Ranks must run the same number of
forward/backward passes (ZeRO-3 gathers parameters in every forward, ZeRO-2 reduces in backward), so
a rank with fewer micro-batches gets empty ones: a one-token dummy whose mask is all False.

Layout of one sequence (prompt p_0..p_{P-1}, completion c_0..c_{C-1}; inputs drop the last token):

    input_ids  p_0 ... p_{P-1} c_0 ... c_{C-2} pad...
    targets    p_1 ... c_0     c_1 ... c_{C-1} pad...     (token predicted at each position)
    mask       0   ... 1       1   ... 1       0...       (completion tokens only)

A sequence longer than the budget gets a micro-batch of its own rather than being cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


class TrajectoryFields(Protocol):
    """The fields of `transport.trajectory.Trajectory` that the learner reads."""

    prompt_ids: torch.Tensor  # [P] int32
    completion_ids: torch.Tensor  # [C] int32
    behaviour_logprobs: torch.Tensor  # [C] fp32
    advantage: float


@dataclass
class MicroBatch:
    """One forward/backward pass of the learner."""

    input_ids: torch.Tensor  # [B, S] int64, right-padded
    targets: torch.Tensor  # [B, S] int64, input shifted left by one
    mask: torch.Tensor  # [B, S] bool, True where targets is a completion token
    behaviour_logprobs: torch.Tensor  # [B, S] fp32, aligned with targets (0 off the mask)
    advantages: torch.Tensor  # [B] fp32
    num_sequences: int  # real sequences (0 for an empty micro-batch)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum().item())

    def to(self, device: torch.device | str) -> "MicroBatch":
        return MicroBatch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            targets=self.targets.to(device, non_blocking=True),
            mask=self.mask.to(device, non_blocking=True),
            behaviour_logprobs=self.behaviour_logprobs.to(device, non_blocking=True),
            advantages=self.advantages.to(device, non_blocking=True),
            num_sequences=self.num_sequences,
        )


def _checked_length(index: int, traj: TrajectoryFields) -> int:
    prompt, completion = len(traj.prompt_ids), len(traj.completion_ids)
    if prompt < 1:
        raise ValueError(f"trajectory {index} has an empty prompt; expected at least one prompt token")
    if len(traj.behaviour_logprobs) != completion:
        raise ValueError(
            f"trajectory {index} has {completion} completion tokens but {len(traj.behaviour_logprobs)} "
            "behaviour logprobs; expected one logprob per completion token"
        )
    # Inputs drop the last token: its logits would predict past the end.
    return prompt + completion - 1


def sequence_lengths(trajectories: Sequence[TrajectoryFields]) -> list[int]:
    """Model input length of each trajectory (prompt + completion - 1), validating each one."""
    return [_checked_length(i, t) for i, t in enumerate(trajectories)]


def assign_to_ranks(trajectories: Sequence[TrajectoryFields], world_size: int) -> list[list[int]]:
    """Indices of the trajectories each rank trains on: balanced by tokens, deterministic."""
    if world_size < 1:
        raise ValueError(f"world_size = {world_size!r}: expected >= 1")
    lengths = sequence_lengths(trajectories)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    load = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        rank = min(range(world_size), key=lambda r: (load[r], len(shares[r]), r))
        shares[rank].append(i)
        load[rank] += lengths[i]
    return [sorted(share) for share in shares]


def group_into_micro_batches(lengths: Sequence[int], micro_batch_tokens: int) -> list[list[int]]:
    """Indices per micro-batch: longest first, each micro-batch's B * max(S) within the budget."""
    if micro_batch_tokens < 1:
        raise ValueError(f"micro_batch_tokens = {micro_batch_tokens!r}: expected >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        # Sorted longest first, so the first member of a micro-batch fixes its padded width.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= micro_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def collate(trajectories: Sequence[TrajectoryFields], pad_token_id: int = 0) -> MicroBatch:
    """Right-padded tensors of the given trajectories (layout in the module docstring)."""
    if not trajectories:
        return empty_micro_batch(pad_token_id)
    lengths = sequence_lengths(trajectories)
    batch, width = len(trajectories), max(lengths)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.int64)  # [B, S]
    targets = torch.full((batch, width), pad_token_id, dtype=torch.int64)  # [B, S]
    mask = torch.zeros((batch, width), dtype=torch.bool)  # [B, S]
    behaviour = torch.zeros((batch, width), dtype=torch.float32)  # [B, S]
    advantages = torch.empty(batch, dtype=torch.float32)  # [B]
    for row, traj in enumerate(trajectories):
        full = torch.cat([torch.as_tensor(traj.prompt_ids), torch.as_tensor(traj.completion_ids)]).long()
        n, prompt = lengths[row], len(traj.prompt_ids)
        input_ids[row, :n] = full[:-1]
        targets[row, :n] = full[1:]
        mask[row, prompt - 1 : n] = True
        behaviour[row, prompt - 1 : n] = torch.as_tensor(traj.behaviour_logprobs, dtype=torch.float32)
        advantages[row] = float(traj.advantage)
    return MicroBatch(input_ids, targets, mask, behaviour, advantages, num_sequences=batch)


def empty_micro_batch(pad_token_id: int = 0) -> MicroBatch:
    """A one-token pass with nothing to learn: keeps a rank's collectives in step with its peers."""
    return MicroBatch(
        input_ids=torch.full((1, 1), pad_token_id, dtype=torch.int64),  # [1, 1]
        targets=torch.full((1, 1), pad_token_id, dtype=torch.int64),
        mask=torch.zeros((1, 1), dtype=torch.bool),
        behaviour_logprobs=torch.zeros((1, 1), dtype=torch.float32),
        advantages=torch.zeros(1, dtype=torch.float32),
        num_sequences=0,
    )


def pack_micro_batches(
    trajectories: Sequence[TrajectoryFields], micro_batch_tokens: int, pad_token_id: int = 0
) -> list[MicroBatch]:
    """One rank's share as micro-batches within the token budget (no padding micro-batches)."""
    groups = group_into_micro_batches(sequence_lengths(trajectories), micro_batch_tokens)
    return [collate([trajectories[i] for i in group], pad_token_id) for group in groups]


def pad_to_count(micro_batches: list[MicroBatch], count: int, pad_token_id: int = 0) -> list[MicroBatch]:
    """Append empty micro-batches up to `count` (the most any learner rank has this step)."""
    if count < len(micro_batches):
        raise ValueError(f"cannot pad {len(micro_batches)} micro-batches down to {count}")
    return micro_batches + [empty_micro_batch(pad_token_id) for _ in range(count - len(micro_batches))]


@dataclass
class RankPlan:
    """A rank's micro-batches for one step plus the step's GLOBAL counts (for the loss normaliser)."""

    micro_batches: list[MicroBatch]
    num_tokens: int  # completion tokens of the whole step, all ranks
    num_sequences: int  # trajectories of the whole step, all ranks


def plan_step(
    trajectories: Sequence[TrajectoryFields],
    rank: int,
    world_size: int,
    micro_batch_tokens: int,
    pad_token_id: int = 0,
) -> RankPlan:
    """From the WHOLE step's trajectories (identical on every rank): this rank's padded micro-batches.

    No communication: every rank computes every rank's micro-batch count from the same list.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank = {rank!r}: expected 0 <= rank < world_size = {world_size}")
    shares = assign_to_ranks(trajectories, world_size)
    lengths = sequence_lengths(trajectories)
    counts = [len(group_into_micro_batches([lengths[i] for i in share], micro_batch_tokens)) for share in shares]
    mine = pack_micro_batches([trajectories[i] for i in shares[rank]], micro_batch_tokens, pad_token_id)
    return RankPlan(
        micro_batches=pad_to_count(mine, max(counts), pad_token_id),
        num_tokens=sum(len(t.completion_ids) for t in trajectories),
        num_sequences=len(trajectories),
    )
