"""Packing trajectories into micro-batches and dealing them to learner ranks."""

from dataclasses import dataclass

import pytest
import torch

from async_grpo.learner.batching import (
    assign_to_ranks,
    collate,
    group_into_micro_batches,
    pack_micro_batches,
    plan_step,
)


@dataclass
class Traj:
    prompt_ids: torch.Tensor
    completion_ids: torch.Tensor
    behaviour_logprobs: torch.Tensor
    advantage: float


def traj(prompt, completion, adv=0.0):
    return Traj(
        torch.tensor(prompt, dtype=torch.int32),
        torch.tensor(completion, dtype=torch.int32),
        -torch.arange(1, len(completion) + 1, dtype=torch.float32) / 10,
        adv,
    )


def test_collate_right_pads_and_masks_completion_tokens_only():
    mb = collate([traj([5, 6], [7, 8, 9], adv=1.5), traj([4], [3], adv=-1.0)], pad_token_id=0)
    # inputs drop the last token: lengths 2+3-1 = 4 and 1+1-1 = 1
    assert mb.input_ids.tolist() == [[5, 6, 7, 8], [4, 0, 0, 0]]
    assert mb.targets.tolist() == [[6, 7, 8, 9], [3, 0, 0, 0]]
    assert mb.mask.tolist() == [[False, True, True, True], [True, False, False, False]]
    torch.testing.assert_close(mb.behaviour_logprobs, torch.tensor([[0.0, -0.1, -0.2, -0.3], [-0.1, 0, 0, 0]]))
    assert mb.advantages.tolist() == [1.5, -1.0]
    assert mb.num_tokens == 4 and mb.num_sequences == 2


def test_micro_batches_respect_the_padded_token_budget():
    # lengths 9, 7, 5, 3, 3 with budget 16: [9] (2*9 > 16), [7, 5] (2*7 = 14; 3*7 > 16), [3, 3]... greedy
    assert group_into_micro_batches([3, 9, 5, 7, 3], 16) == [[1], [3, 2], [0, 4]]
    # a sequence longer than the budget gets its own micro-batch instead of being cut
    assert group_into_micro_batches([20, 2], 16) == [[0], [1]]


def test_ranks_get_balanced_deterministic_shares():
    lengths = [9, 1, 5, 5, 4, 2]  # input lengths = prompt 1 + completion n - 1 = n
    trajs = [traj([1], [2] * n) for n in lengths]
    shares = assign_to_ranks(trajs, 2)
    # LPT: 9 -> r0, 5 -> r1, 5 -> r1 (10), 4 -> r0 (13), 2 -> r1 (12), 1 -> r1 (13)
    assert shares == [[0, 4], [1, 2, 3, 5]]
    assert assign_to_ranks(trajs, 2) == shares


def test_every_rank_gets_the_same_number_of_micro_batches_and_global_counts():
    trajs = [traj([1, 2], [3] * 8), traj([1], [3] * 2), traj([1], [3]), traj([1], [3] * 2)]
    plans = [plan_step(trajs, rank, 2, micro_batch_tokens=9) for rank in (0, 1)]
    # rank 0 gets the 9-token sequence (1 micro-batch), rank 1 the three short ones (2+2+1 tokens: one)
    assert [len(p.micro_batches) for p in plans] == [1, 1]
    plans = [plan_step(trajs, rank, 2, micro_batch_tokens=4) for rank in (0, 1)]
    counts = [len(p.micro_batches) for p in plans]
    assert counts[0] == counts[1] == 2  # rank 0: [9] + one empty; rank 1: [2, 2], [1]
    assert plans[0].micro_batches[1].num_sequences == 0 and plans[0].micro_batches[1].num_tokens == 0
    assert all(p.num_tokens == 13 and p.num_sequences == 4 for p in plans)


def test_bad_trajectory_is_a_clear_error():
    bad = Traj(torch.tensor([1]), torch.tensor([2, 3]), torch.tensor([-0.1]), 0.0)
    with pytest.raises(ValueError, match="2 completion tokens but 1 behaviour logprobs"):
        pack_micro_batches([bad], 100)
