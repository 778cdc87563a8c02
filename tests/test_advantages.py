"""Group-relative advantages against hand-computed numbers."""

import math

import pytest
import torch

from async_grpo.advantages import compute_advantages, group_advantages, zero_variance_mask
from async_grpo.config import AdvantageConfig

# Three groups, interleaved on purpose (groups need not be contiguous):
#   group 7: rewards 1, 0, 0, 1 -> mean 0.5, std 0.5  -> A = +1, -1, -1, +1
#   group 3: rewards 0.5, 0.5   -> zero variance      -> A = 0, 0
#   group 9: rewards 3, 0, 0    -> mean 1, std sqrt(2) -> A = 2/sqrt(2), -1/sqrt(2), -1/sqrt(2)
REWARDS = [1.0, 0.5, 3.0, 0.0, 0.0, 0.5, 0.0, 1.0, 0.0]
GROUPS = [7, 3, 9, 7, 7, 3, 9, 7, 9]
S2 = math.sqrt(2.0)


def test_std_normalised_advantages_match_hand_computation():
    adv = group_advantages(REWARDS, GROUPS, std_normalize=True, eps=0.0)
    expected = torch.tensor([1.0, 0.0, 2 / S2, -1.0, -1.0, 0.0, -1 / S2, 1.0, -1 / S2])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)
    assert adv.dtype == torch.float32


def test_eps_is_added_to_the_std():
    adv = group_advantages([1.0, 0.0], [0, 0], std_normalize=True, eps=0.5)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5]), rtol=0, atol=1e-7)  # 0.5 / (0.5 + 0.5)


def test_mean_centred_advantages_without_std_division_dr_grpo():
    adv = group_advantages(REWARDS, GROUPS, std_normalize=False)
    expected = torch.tensor([0.5, 0.0, 2.0, -0.5, -0.5, 0.0, -1.0, 0.5, -1.0])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)


def test_zero_variance_groups_are_filtered_when_configured():
    keep = zero_variance_mask(REWARDS, GROUPS)
    assert keep.tolist() == [True, False, True, True, True, False, True, True, True]
    out = compute_advantages(REWARDS, GROUPS, AdvantageConfig(filter_zero_variance=True))
    assert out.keep.tolist() == keep.tolist()
    unfiltered = compute_advantages(REWARDS, GROUPS, AdvantageConfig(filter_zero_variance=False))
    assert unfiltered.keep.all() and unfiltered.keep.numel() == 9


def test_single_member_group_gets_zero_advantage_not_nan():
    adv = group_advantages([5.0], [0], std_normalize=True, eps=1e-6)
    assert adv.tolist() == [0.0]


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="3 values but group_ids has 2"):
        group_advantages([1.0, 2.0, 3.0], [0, 0])
    with pytest.raises(ValueError, match="not finite"):
        group_advantages([1.0, float("nan")], [0, 0])
