"""Chunked token logprobs / entropy: exact values, gradients equal to plain autograd, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from async_grpo.model import token_entropy, token_logprobs


def test_logprob_and_entropy_of_a_hand_computed_distribution():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = [1/4, 3/4]
    lp = token_logprobs(logits, torch.tensor([[1]]))
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.75)]]))
    expected_h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(token_entropy(logits), torch.tensor([[expected_h]]))
    # Temperature 2 halves the logits: p = [1, sqrt(3)] / (1 + sqrt(3)).
    lp_t2 = token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    torch.testing.assert_close(lp_t2, torch.tensor([[-math.log(1 + math.sqrt(3.0))]]))


@pytest.mark.parametrize("chunk_rows", [1, 4, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_values_and_gradients_equal_dense_autograd(chunk_rows, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 11, generator=gen, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 11, (3, 5), generator=gen)
    weights = torch.randn(3, 5, generator=gen, dtype=torch.float64)

    lp = token_logprobs(logits, targets, temperature, chunk_rows)
    h = token_entropy(logits, temperature, chunk_rows)
    (grad_lp,) = torch.autograd.grad((lp * weights).sum(), logits)
    (grad_h,) = torch.autograd.grad((h * weights).sum(), logits)

    ref_logp = torch.log_softmax(logits / temperature, dim=-1)
    ref_lp = ref_logp.gather(-1, targets[..., None]).squeeze(-1)
    ref_h = -(ref_logp.exp() * ref_logp).sum(-1)
    (ref_grad_lp,) = torch.autograd.grad((ref_lp * weights).sum(), logits, retain_graph=True)
    (ref_grad_h,) = torch.autograd.grad((ref_h * weights).sum(), logits)

    torch.testing.assert_close(lp, ref_lp.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(h, ref_h.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_lp, ref_grad_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_h, ref_grad_h, atol=1e-6, rtol=0)


def test_bf16_logits_give_fp32_logprobs_and_bf16_gradient():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_()
    targets = torch.zeros(2, 3, dtype=torch.long)
    lp = token_logprobs(logits, targets, chunk_rows=2)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, torch.log_softmax(logits.float(), -1)[..., 0], atol=1e-6, rtol=0)
    lp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_bad_inputs_are_named():
    logits = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"targets has shape \(2, 4\): expected \(2, 3\)"):
        token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature = 0"):
        token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="chunk_rows = 0"):
        token_entropy(logits, chunk_rows=0)
