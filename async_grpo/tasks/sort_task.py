"""The embedded default task: sort a string of digits.

Prompt `␂sort:31452=` (BOS, then the digits, `task.params.digits` of them, default 5); the target is the
sorted digits `12345` followed by EOS. Reward = fraction of positions right: position i of the completion
equals sorted[i], counted over the first `digits` positions and divided by `digits`; extra tokens before
EOS add nothing and tokens after EOS are never seen (the task cuts completions there).

The prompt set is `task.params.num_prompts` digit strings (default 100000), prompt k drawn from a
generator seeded by (build seed, k): the same set on every rank with no data file. A 2-layer, 128-wide
model learns this from scratch by GRPO alone in a few hundred steps, which makes it the smoke test and demo.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from async_grpo.config import ConfigError, TaskConfig
from async_grpo.tasks.base import PromptItem
from async_grpo.tasks.char_tokenizer import CharTokenizer
from async_grpo.tasks.reward_spec import RewardSpec
from async_grpo.tasks.scored_task import ScoredTask, reward_scorer

SORT_PARAMS = {"digits": 5, "num_prompts": 100_000}


def sort_reward(prompt: str, completion: str, item: dict) -> float:
    """Fraction of the target's positions where the completion has the target's character."""
    target = item["answer"]
    return sum(1 for got, want in zip(completion, target) if got == want) / len(target)


class SortPrompts:
    """`PromptSource` of generated digit strings; `item(k)` depends only on (seed, k)."""

    def __init__(self, tokenizer: CharTokenizer, seed: int, digits: int, num_prompts: int):
        self.tokenizer, self.seed, self.digits, self.num_prompts = tokenizer, seed, digits, num_prompts

    def __len__(self) -> int:
        return self.num_prompts

    def item(self, index: int) -> PromptItem:
        if not 0 <= index < self.num_prompts:
            raise IndexError(f"sort prompt index {index}: expected 0 <= index < {self.num_prompts}")
        drawn = np.random.default_rng([self.seed, index]).integers(0, 10, size=self.digits)  # [digits]
        digits = "".join(str(int(d)) for d in drawn)
        prompt = f"sort:{digits}="
        return PromptItem(
            id=index,
            prompt_ids=[self.tokenizer.bos_id, *self.tokenizer.encode(prompt)],
            prompt=prompt,
            answer="".join(sorted(digits)),
        )


def sort_params(params: dict[str, Any]) -> dict[str, int]:
    """`task.params` for the sort task, defaults filled in; unknown keys and bad values are ConfigErrors."""
    unknown = sorted(set(params) - set(SORT_PARAMS))
    if unknown:
        key = unknown[0]
        raise ConfigError(f"task.params.{key}", params[key], f"one of the sort task's params {sorted(SORT_PARAMS)}")
    resolved = {**SORT_PARAMS, **params}
    for key, value in resolved.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"task.params.{key}", value, "a positive integer")
    return resolved


def build_sort_task(cfg: TaskConfig, seed: int) -> ScoredTask:
    params = sort_params(cfg.params)
    tokenizer = CharTokenizer()
    source = SortPrompts(tokenizer, seed, params["digits"], params["num_prompts"])
    scorer = reward_scorer(cfg, RewardSpec(f"{__name__}:sort_reward"))
    return ScoredTask("sort", tokenizer, source, scorer)
