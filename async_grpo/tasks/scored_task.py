"""The one Task implementation: a tokenizer, a prompt source and a reward scorer put together.

What differs between tasks (how prompts are made, which reward) is decided by the task's builder
(`sort_task`, `math_task`, `file_task`); what every task does the same way lives here: cutting a
completion at its first stop token before decoding (tokens past EOS never reach a reward), handing
out sharded prompt streams, and scoring through `RewardScorer` (inline or in a process pool).
"""

from __future__ import annotations

from typing import Sequence

from async_grpo.config import TaskConfig
from async_grpo.tasks.base import PromptItem, TaskTokenizer
from async_grpo.tasks.prompt_stream import PromptSource, PromptStream
from async_grpo.tasks.reward_pool import RewardScorer
from async_grpo.tasks.reward_spec import RewardSpec


class ScoredTask:
    """Implements `Task`."""

    def __init__(self, name: str, tokenizer: TaskTokenizer, source: PromptSource, scorer: RewardScorer):
        self.name, self.tokenizer, self.source, self.scorer = name, tokenizer, source, scorer

    def __len__(self) -> int:
        return len(self.source)

    def max_prompt_len(self, scan: int = 2000) -> int:
        """Longest prompt (in tokens) among the first `scan` prompts: what start-up checks size the KV pool by.

        Exact for sources of at most `scan` prompts and for the synthetic tasks (all prompts one length);
        rollout workers still skip, and count, any later prompt too long to fit.
        """
        return max((len(self.source.item(i).prompt_ids) for i in range(min(scan, len(self.source)))), default=0)

    def prompts(self, seed: int, shard_rank: int = 0, shard_count: int = 1) -> PromptStream:
        return PromptStream(self.source, seed, shard_rank, shard_count)

    def completion_text(self, completion_ids: Sequence[int]) -> str:
        """The completion decoded up to and excluding its first stop token."""
        ids = [int(t) for t in completion_ids]  # also accepts a tensor, whose elements would not hash as ints
        stops = self.tokenizer.stop_ids
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        return self.tokenizer.decode(ids[:end])

    def score(self, item: PromptItem, completion_ids: Sequence[int]) -> float:
        return self.score_batch([item], [completion_ids])[0]

    def score_batch(self, items: Sequence[PromptItem], completions: Sequence[Sequence[int]]) -> list[float]:
        if len(items) != len(completions):
            raise ValueError(
                f"score_batch got {len(items)} items and {len(completions)} completions: expected equal counts"
            )
        calls = [(it.prompt, self.completion_text(ids), it.reward_item()) for it, ids in zip(items, completions)]
        return self.scorer.score_batch(calls)

    def reward_stats(self) -> dict[str, int]:
        return dict(self.scorer.stats)

    def close(self) -> None:
        self.scorer.close()


def reward_scorer(cfg: TaskConfig, builtin: RewardSpec) -> RewardScorer:
    """The scorer for `cfg`: the user's `task.reward` if set, else the task's built-in reward."""
    spec = RewardSpec(cfg.reward) if cfg.reward else builtin
    return RewardScorer(
        spec, workers=cfg.reward_workers, timeout_s=cfg.reward_timeout_s, on_failure=cfg.reward_on_failure
    )
