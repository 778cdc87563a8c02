"""Weights changing mid-generation: the pool is invalidated, live samples re-prefilled, versions recorded."""

import pytest
import torch

from async_grpo.config import KVConfig, ModelConfig, SamplingConfig
from async_grpo.model import build_model
from async_grpo.workers.engine import GenerationEngine


def dense_greedy(model, prompt, steps):
    """Greedy continuation through the dense training path (no KV cache at all)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


class FlipAfter:
    """A DecodeControl that delivers `new_state` as version 1 after `steps` steps."""

    def __init__(self, model, new_state, steps):
        self.model, self.new_state, self.steps = model, new_state, steps
        self.polls = 0
        self.loads = 0

    def poll_new_weights(self) -> bool:
        self.polls += 1
        return self.polls == self.steps + 1

    def on_new_weights(self) -> int:
        self.model.load_full_state_dict(self.new_state)
        self.loads += 1
        return 1


def test_new_weights_mid_generation_reprefill_and_continue():
    old = build_model(ModelConfig(preset="tiny", init_seed=0), "cpu", torch.float32).eval()
    new = build_model(ModelConfig(preset="tiny", init_seed=1), "cpu", torch.float32).eval()
    policy = build_model(ModelConfig(preset="tiny", init_seed=0), "cpu", torch.float32).eval()
    p0, p1 = [3, 14, 15, 9, 2], [6, 5, 35, 8, 9, 7]
    # Worst cases with block 4 and 8 new tokens: p0 1 + 2*2 = 5, p1 1 + 2*3 = 7 blocks: one group at a time.
    engine = GenerationEngine(policy, KVConfig(block_size=4, num_blocks=8), "cpu", torch.float32)
    control = FlipAfter(policy, new.full_state_dict(), steps=3)
    params = SamplingConfig(temperature=0, max_new_tokens=8, ignore_eos=True)

    first, second = engine.generate([p0, p1], 2, params, control=control)

    head = dense_greedy(old, p0, 3)  # prefill + 2 decode steps under the old weights
    expected_p0 = head + dense_greedy(new, p0 + head, 5)
    assert dense_greedy(old, p0, 8) != expected_p0  # the update really changed the continuation
    for c in first:
        assert c.token_ids == expected_p0
        assert c.policy_version == 0  # the oldest weights that produced it
        assert c.finish_reason == "length"
    for c in second:  # admitted after the update
        assert c.token_ids == dense_greedy(new, p1, 8)
        assert c.policy_version == 1
    assert control.loads == 1
    assert engine.policy_version == 1
    stats = engine.last_stats
    assert stats.weight_updates == 1
    # p0 prefilled, p0 prefilled again once for both samples after the update, then p1.
    assert stats.prefill_tokens == len(p0) + len(p0) + len(p1)
    assert engine.pool.stats().blocks_in_use == 0


def test_sampled_samples_keep_their_tokens_across_an_update():
    policy = build_model(ModelConfig(preset="tiny", init_seed=0), "cpu", torch.float32).eval()
    new = build_model(ModelConfig(preset="tiny", init_seed=1), "cpu", torch.float32).eval()
    engine = GenerationEngine(policy, KVConfig(block_size=4, num_blocks=32), "cpu", torch.float32)
    params = SamplingConfig(temperature=1.0, max_new_tokens=6, ignore_eos=True)
    prompt = [9, 8, 7, 6, 5]
    baseline = engine.generate([prompt], 3, params, seed=4)[0]
    control = FlipAfter(policy, new.full_state_dict(), steps=2)
    updated = engine.generate([prompt], 3, params, seed=4, control=control)[0]
    for before, after in zip(baseline, updated):
        assert after.token_ids[:2] == before.token_ids[:2]  # drawn before the update: untouched
        assert after.logprobs[:2] == before.logprobs[:2]
        assert len(after.token_ids) == len(after.logprobs) == 6
        assert after.policy_version == 0
    # Every logprob is under the weights that drew its token: old for the first 2, new after.
    old = build_model(ModelConfig(preset="tiny", init_seed=0), "cpu", torch.float32).eval()
    for c in updated:
        full = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logp_old = torch.log_softmax(old(full)[0].float(), -1)  # [S, V]
            logp_new = torch.log_softmax(new(full)[0].float(), -1)
        p = len(prompt)
        expected = [(logp_old if i < 2 else logp_new)[p - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
        assert c.logprobs == pytest.approx(expected, abs=1e-5)
    assert engine.last_stats.prefill_tokens == 2 * len(prompt)


class Steady:
    """A DecodeControl with no updates: knows the loaded version, asks to stop after `stop_after` steps."""

    def __init__(self, version, stop_after=None):
        self.version, self.stop_after, self.polls = version, stop_after, 0

    def poll_new_weights(self) -> bool:
        self.polls += 1
        return False

    def on_new_weights(self) -> int:
        raise AssertionError("no update was announced")

    def poll_stop(self) -> bool:
        return self.stop_after is not None and self.polls > self.stop_after


def test_version_of_weights_loaded_between_calls_is_recorded():
    policy = build_model(ModelConfig(preset="tiny", init_seed=0), "cpu", torch.float32).eval()
    engine = GenerationEngine(policy, KVConfig(block_size=4, num_blocks=32), "cpu", torch.float32)
    params = SamplingConfig(temperature=0, max_new_tokens=3, ignore_eos=True)
    out = engine.generate([[1, 2, 3]], 2, params, control=Steady(version=7))
    assert [c.policy_version for c in out[0]] == [7, 7]
    assert engine.policy_version == 7


def test_stop_request_aborts_unfinished_samples_at_once():
    policy = build_model(ModelConfig(preset="tiny", init_seed=0), "cpu", torch.float32).eval()
    # One group at a time (worst case 1 + 2*3 = 7 blocks each), so the second prompt never starts.
    engine = GenerationEngine(policy, KVConfig(block_size=4, num_blocks=8), "cpu", torch.float32)
    params = SamplingConfig(temperature=0, max_new_tokens=8, ignore_eos=True)
    first, second = engine.generate([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], 2, params, control=Steady(0, stop_after=2))
    assert engine.stopped
    assert [(len(c.token_ids), len(c.logprobs), c.finish_reason) for c in first] == [(2, 2, "abort")] * 2
    assert [(c.token_ids, c.finish_reason) for c in second] == [([], "abort")] * 2
    assert engine.pool.stats().blocks_in_use == 0
    assert engine.last_stats.steps == 2
