"""Each GRPO loss variant's value and gradient against a hand computation.

Two sequences, of 3 and 2 completion tokens (the second row is right-padded), advantages A = [1, -0.5],
and current/behaviour ratios r = pi/pi_beh chosen so that every branch of the clip is exercised:

    seq 0 (A = +1):   r = 1.0 -> L = -1.0                grad dL/dlogp = -r*A = -1.0
                      r = 1.5 -> clipped to 1.28, L = -1.28, grad 0 (clip active)
                      r = 0.7 -> min(0.7, 0.8) = 0.7, L = -0.7, grad -0.7
    seq 1 (A = -0.5): r = 0.9 -> L = +0.45,  grad +0.45
                      r = 1.3 -> min(-0.65, -0.64) = -0.65, L = +0.65, grad +0.65
    sum L = -1.88 over 5 tokens.
"""

import math

import pytest
import torch

from async_grpo.config import LossConfig
from async_grpo.learner.loss import grpo_loss, loss_normalizer

MASK = torch.tensor([[True, True, True], [True, True, False]])
ADV = torch.tensor([1.0, -0.5])
BEH = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.3, float("-inf")]])  # -inf in padding must not leak
RATIO = torch.tensor([[1.0, 1.5, 0.7], [0.9, 1.3, 1.0]])


def _current():
    logp = torch.where(MASK, BEH + RATIO.log(), torch.zeros(()))
    return logp.clone().requires_grad_(True)


def _run(cfg, normalizer, **kw):
    logp = _current()
    out = grpo_loss(logp, BEH, ADV, MASK, cfg, normalizer, **kw)
    out.loss.backward()
    return out, logp.grad


def test_token_mean_clipped_surrogate_value_and_gradient():
    cfg = LossConfig(correction="none", eps_low=0.2, eps_high=0.28, aggregation="token_mean")
    norm = loss_normalizer(cfg, num_tokens=5, num_sequences=2, max_new_tokens=3)
    assert norm == 5.0
    out, grad = _run(cfg, norm)
    assert out.loss.item() == pytest.approx(-1.88 / 5, abs=1e-6)
    expected = torch.tensor([[-1.0, 0.0, -0.7], [0.45, 0.65, 0.0]]) / 5
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
    assert out.sums["clipped"].item() == 1.0 and out.sums["tokens"].item() == 5.0
    assert out.maxes["is_weight_max"].item() == pytest.approx(1.5, abs=1e-6)
    assert out.sums["is_weight"].item() == pytest.approx(1.0 + 1.5 + 0.7 + 0.9 + 1.3, abs=1e-5)


def test_seq_mean_averages_per_sequence_token_means():
    cfg = LossConfig(correction="none", aggregation="seq_mean")
    norm = loss_normalizer(cfg, num_tokens=5, num_sequences=2, max_new_tokens=3)
    out, grad = _run(cfg, norm)
    # ((-1 - 1.28 - 0.7) / 3 + (0.45 + 0.65) / 2) / 2
    assert out.loss.item() == pytest.approx((-2.98 / 3 + 1.1 / 2) / 2, abs=1e-6)
    expected = torch.tensor([[-1.0 / 6, 0.0, -0.7 / 6], [0.45 / 4, 0.65 / 4, 0.0]])
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)


def test_constant_normaliser_dr_grpo():
    cfg = LossConfig(correction="none", aggregation="constant", constant_normalizer=4)
    norm = loss_normalizer(cfg, num_tokens=5, num_sequences=2, max_new_tokens=99)
    assert norm == 8.0  # 2 sequences * 4
    out, grad = _run(cfg, norm)
    assert out.loss.item() == pytest.approx(-1.88 / 8, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, 0.0, -0.7], [0.45, 0.65, 0.0]]) / 8, rtol=0, atol=1e-6)
    default = LossConfig(aggregation="constant")
    assert loss_normalizer(default, num_tokens=5, num_sequences=2, max_new_tokens=3) == 6.0


def test_truncated_importance_weight_decoupled_objective():
    # w = min(pi_prox / pi_beh, cap) with pi_prox = current policy (detached): w = [1, 1.4, 0.7; 0.9, 1.3].
    cfg = LossConfig(correction="tis", is_cap=1.4, aggregation="token_mean")
    out, grad = _run(cfg, 5.0)
    w_times_a = torch.tensor([[1.0, 1.4, 0.7], [-0.45, -0.65, 0.0]])
    assert out.loss.item() == pytest.approx(-w_times_a.sum().item() / 5, abs=1e-6)  # -2.0 / 5
    assert out.loss.item() == pytest.approx(-0.4, abs=1e-6)
    torch.testing.assert_close(grad, -w_times_a / 5, rtol=0, atol=1e-6)
    assert out.sums["truncated"].item() == 1.0  # only the r = 1.5 token exceeds the cap
    assert out.sums["clipped"].item() == 0.0  # r = pi/pi_prox = 1: the clip is inactive


def test_tis_with_behaviour_as_proximal_policy_equals_plain_clipped_surrogate():
    tis = LossConfig(correction="tis", is_cap=10.0)
    out_tis, grad_tis = _run(tis, 5.0, proximal_logprobs=BEH)
    out_none, grad_none = _run(LossConfig(correction="none"), 5.0)
    assert out_tis.loss.item() == pytest.approx(out_none.loss.item(), abs=1e-7)
    torch.testing.assert_close(grad_tis, grad_none, rtol=0, atol=1e-7)
    assert out_tis.sums["clipped"].item() == 1.0


def test_k3_kl_to_reference_adds_beta_times_k3():
    # log(pi_ref / pi) = d = [0, ln2, -ln2; 0, 0]: k3 = e^d - d - 1 = [0, 1 - ln2, ln2 - 0.5; 0, 0], sum 0.5.
    d = torch.tensor([[0.0, math.log(2.0), -math.log(2.0)], [0.0, 0.0, 0.0]])
    ref = torch.where(MASK, BEH + RATIO.log(), torch.zeros(())) + d
    cfg = LossConfig(correction="none", kl_beta=0.1)
    out, grad = _run(cfg, 5.0, ref_logprobs=ref)
    assert out.loss.item() == pytest.approx(-1.88 / 5 + 0.1 * 0.5 / 5, abs=1e-6)
    assert out.sums["kl"].item() == pytest.approx(0.5 / 5, abs=1e-6)
    # d k3 / d logp = 1 - e^d = [0, -1, 0.5; 0, 0]
    expected = torch.tensor([[-1.0, 0.0, -0.7], [0.45, 0.65, 0.0]]) / 5
    expected += 0.1 * torch.tensor([[0.0, -1.0, 0.5], [0.0, 0.0, 0.0]]) / 5
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)


def test_micro_batch_parts_with_global_normaliser_sum_to_the_whole():
    cfg = LossConfig(correction="none", aggregation="token_mean")
    whole, grad_whole = _run(cfg, 5.0)
    logp = _current()
    parts = [grpo_loss(logp[i : i + 1], BEH[i : i + 1], ADV[i : i + 1], MASK[i : i + 1], cfg, 5.0) for i in (0, 1)]
    total = parts[0].loss + parts[1].loss
    total.backward()
    assert total.item() == pytest.approx(whole.loss.item(), abs=1e-7)
    torch.testing.assert_close(logp.grad, grad_whole, rtol=0, atol=1e-7)
    # A per-micro-batch token mean would give a different, packing-dependent number.
    per_part = (-2.98 / 3 + 1.1 / 2) / 2
    assert abs(per_part - whole.loss.item()) > 0.1


def test_metrics_entropy_and_approx_kl_sums():
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])  # padding value must be ignored
    out, _ = _run(LossConfig(correction="none"), 5.0, entropy=entropy)
    assert out.sums["entropy"].item() == 15.0
    expected_kl = sum(r - math.log(r) - 1 for r in (1.0, 1.5, 0.7, 0.9, 1.3))
    assert out.sums["approx_kl"].item() == pytest.approx(expected_kl, abs=1e-5)


def test_bad_shapes_and_missing_reference_are_clear_errors():
    cfg = LossConfig(kl_beta=0.1)
    with pytest.raises(ValueError, match="expected ref_logprobs"):
        grpo_loss(_current(), BEH, ADV, MASK, cfg, 5.0)
    with pytest.raises(ValueError, match=r"advantages must be \[B\] = \[2\]"):
        grpo_loss(_current(), BEH, ADV[:1], MASK, LossConfig(), 5.0)
