"""Sampling: greedy, seeded reproducibility, top-k/top-p, and the recorded logprobs."""

import math

import pytest
import torch

from async_grpo.config import SamplingConfig
from async_grpo.workers.sampling import make_generator, sample_tokens, transformed_logprobs


def params(**kw):
    return SamplingConfig(max_new_tokens=4, **kw)


def test_greedy_takes_argmax_and_records_model_logprob():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    tokens, logprobs = sample_tokens(logits, params(temperature=0), None)
    assert tokens.tolist() == [1, 2]
    expected = torch.log_softmax(logits, -1)[[0, 1], [1, 2]]
    torch.testing.assert_close(logprobs, expected)
    assert logprobs.dtype == torch.float32


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    p = params(temperature=1.0)
    a = sample_tokens(logits, p, make_generator(7, torch.device("cpu")))[0]
    b = sample_tokens(logits, p, make_generator(7, torch.device("cpu")))[0]
    c = sample_tokens(logits, p, make_generator(8, torch.device("cpu")))[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_one_equals_greedy():
    logits = torch.randn(32, 40, generator=torch.Generator().manual_seed(1))
    greedy, _ = sample_tokens(logits, params(temperature=0), None)
    tokens, logprobs = sample_tokens(logits, params(temperature=0.7, top_k=1), make_generator(0, torch.device("cpu")))
    assert torch.equal(tokens, greedy)
    assert torch.all(logprobs == 0)  # the only token left has probability 1


def test_top_p_keeps_smallest_prefix_reaching_p_hand_computed():
    # probs at temperature 1: [0.5, 0.3, 0.15, 0.05]; top_p 0.7 keeps {0, 1} (0.5 < 0.7, 0.8 >= 0.7).
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    lp = transformed_logprobs(probs.log(), params(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(lp.exp(), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # top_p exactly at a prefix's mass keeps only that prefix.
    lp = transformed_logprobs(probs.log(), params(temperature=1.0, top_p=0.5))
    torch.testing.assert_close(lp.exp(), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_recorded_logprobs_are_under_the_transformed_distribution():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 30, generator=gen) * 3
    p = params(temperature=0.6, top_k=10, top_p=0.8)
    tokens, logprobs = sample_tokens(logits, p, make_generator(5, torch.device("cpu")))
    # Hand-applied transforms, one row at a time.
    for row in range(logits.shape[0]):
        scaled = logits[row] / 0.6
        kth = torch.sort(scaled, descending=True).values[9]
        scaled = torch.where(scaled >= kth, scaled, torch.tensor(-math.inf))
        probs = torch.softmax(scaled, 0)
        order = torch.argsort(probs, descending=True)
        keep, mass = [], 0.0
        for idx in order.tolist():
            keep.append(idx)
            mass += probs[idx].item()
            if mass >= 0.8:
                break
        assert tokens[row].item() in keep
        kept = torch.full_like(scaled, -math.inf)
        kept[keep] = scaled[keep]
        expected = torch.log_softmax(kept, 0)[tokens[row]]
        assert logprobs[row].item() == pytest.approx(expected.item(), abs=1e-5)


def test_sampling_follows_the_distribution():
    # Two tokens with probabilities 0.8 / 0.2: 20000 draws land within 1% of 0.8.
    logits = torch.tensor([[math.log(0.8), math.log(0.2)]]).expand(20000, 2)
    tokens, _ = sample_tokens(logits, params(temperature=1.0), make_generator(0, torch.device("cpu")))
    assert abs((tokens == 0).float().mean().item() - 0.8) < 0.01


def test_logits_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"logits of shape \(3,\): expected \[rows, vocab\]"):
        sample_tokens(torch.zeros(3), params(), None)
