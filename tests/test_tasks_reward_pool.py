"""Rewards that hang, raise or kill their process are scored `reward_on_failure`, counted, and survived."""

from __future__ import annotations

import sys
import textwrap
import time

import pytest

from async_grpo.config import ConfigError, TaskConfig
from async_grpo.tasks import build_task
from async_grpo.tasks.reward_pool import RewardScorer
from async_grpo.tasks.reward_spec import RewardSpec, load_reward_fn

_REWARDS = textwrap.dedent(
    """
    import os
    import time

    def misbehaving(prompt, completion, item):
        mode = item.get("mode", "ok")
        if mode == "sleep":
            time.sleep(60)
        if mode == "raise":
            raise RuntimeError("reward blew up")
        if mode == "exit":
            os._exit(3)
        if mode == "nan":
            return float("nan")
        return float(len(completion))

    def two_args(prompt, completion):
        return 0.0

    NOT_A_FUNCTION = 3
    """
)


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    """A user reward module on the path of this process and of spawned children (which copy sys.path)."""
    name = f"user_rewards_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _call(mode: str, completion: str = "abc") -> tuple[str, str, dict]:
    return ("p", completion, {"mode": mode})


def test_inline_scoring_catches_exceptions_and_bad_values(rewards_module):
    scorer = RewardScorer(RewardSpec(f"{rewards_module}:misbehaving"), workers=0, on_failure=-1.0)
    calls = [_call("ok"), _call("raise"), _call("nan"), _call("ok", "abcdef")]
    assert scorer.score_batch(calls) == [3.0, -1.0, -1.0, 6.0]
    assert scorer.stats == {"calls": 4, "failures": 2, "timeouts": 0, "errors": 2, "crashes": 0, "restarts": 0}
    assert scorer.last_error == "error: TypeError: reward function returned nan: expected a finite float"


def test_pool_scores_hanging_raising_and_crashing_rewards_as_failures(rewards_module):
    timeout_s = 1.0
    spec = RewardSpec(f"{rewards_module}:misbehaving")
    with RewardScorer(spec, workers=2, timeout_s=timeout_s, on_failure=-0.5) as scorer:
        assert scorer._pool == []  # no process until something is scored
        assert scorer.score_batch([_call("ok", "ab")]) == [2.0]

        start = time.monotonic()
        scores = scorer.score_batch([_call("sleep"), _call("ok", "abcd"), _call("raise"), _call("exit"), _call("ok")])
        elapsed = time.monotonic() - start
        assert scores == [-0.5, 4.0, -0.5, -0.5, 3.0]
        # The hung call cost one timeout, not its 60 s sleep (slack for respawning on a busy machine).
        assert timeout_s <= elapsed < 30
        assert scorer.stats == {"calls": 6, "failures": 3, "timeouts": 1, "errors": 1, "crashes": 1, "restarts": 2}

        # The replaced processes serve later calls, and a second hang is handled the same way.
        assert scorer.score_batch([_call("ok", "x"), _call("ok", "xy"), _call("ok", "xyz")]) == [1.0, 2.0, 3.0]
        assert scorer.score_batch([_call("sleep"), _call("ok", "xy")]) == [-0.5, 2.0]
        assert scorer.stats["timeouts"] == 2 and scorer.stats["restarts"] == 3
        assert all(w.process.is_alive() for w in scorer._pool)
        processes = [w.process for w in scorer._pool]
    assert not any(p.is_alive() for p in processes)
    with pytest.raises(RuntimeError, match="is closed"):
        scorer.score("p", "c", {})


def test_task_scores_through_a_user_reward_in_a_pool(rewards_module):
    cfg = TaskConfig(name="sort", reward=f"{rewards_module}:misbehaving", reward_workers=1, reward_timeout_s=5.0)
    task = build_task(cfg, seed=0)
    try:
        item = task.source.item(0)
        tok = task.tokenizer
        # The user reward sees the completion cut at EOS: "123" (3 characters), not "123" + "456".
        assert task.score(item, tok.encode("123") + [tok.eos_id] + tok.encode("456")) == 3.0
        assert task.reward_stats()["calls"] == 1
    finally:
        task.close()


def test_user_reward_errors_name_the_path_and_what_was_expected(rewards_module):
    not_importable = r"'no_such_module_xyz:f'.*importing 'no_such_module_xyz' failed \(ModuleNotFoundError"
    with pytest.raises(ConfigError, match=not_importable):
        load_reward_fn("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match=r"'misbehaving'.*package.module:function"):
        load_reward_fn("misbehaving")
    with pytest.raises(ConfigError, match=r"has no attribute 'missing'"):
        load_reward_fn(f"{rewards_module}:missing")
    with pytest.raises(ConfigError, match=r"'NOT_A_FUNCTION' is a int"):
        load_reward_fn(f"{rewards_module}:NOT_A_FUNCTION")
    wrong_signature = r"fn\(prompt: str, completion: str, item: dict\) -> float, got two_args\(prompt, completion\)"
    with pytest.raises(ConfigError, match=wrong_signature):
        load_reward_fn(f"{rewards_module}:two_args")
    with pytest.raises(ConfigError, match=r"config key 'task.reward'"):
        build_task(TaskConfig(name="sort", reward="no_such_module_xyz:f"), seed=0)
