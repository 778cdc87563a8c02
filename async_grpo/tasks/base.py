"""What a task is: a prompt source plus a reward, behind one small interface.

Rollout workers take prompts from `Task.prompts(seed, shard_rank, shard_count)` (a resumable, sharded,
per-epoch-shuffled stream), generate completions and score them with `Task.score`/`Task.score_batch`.
Scoring decodes a completion only up to (and excluding) its first stop token, so tokens a sampler
produced past EOS can never earn reward. `build_task` turns the `task:` config section into a Task.

Tasks built in: `sort` (synthetic, character tokenizer shipped in code), `math` (GSM8K-style files),
`jsonl` (any JSONL/Parquet prompt file with a user reward or exact-match scoring).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

if TYPE_CHECKING:
    from async_grpo.config import TaskConfig
    from async_grpo.tasks.prompt_stream import PromptStream


@dataclass(frozen=True)
class PromptItem:
    """One prompt as the workers see it: token ids ready for prefill, plus what the reward needs."""

    id: int  # index of the prompt in its source (stable across epochs and shards)
    prompt_ids: list[int]  # fully formatted (chat template / BOS applied); prefilled as is
    prompt: str  # the raw prompt text, before any template: what reward functions receive
    answer: str | None = None  # reference answer, when the source has one
    metadata: dict[str, Any] = field(default_factory=dict)  # other fields of the source record

    def reward_item(self) -> dict[str, Any]:
        """The `item` dict handed to reward functions: the record's fields plus id/prompt/answer."""
        return {**self.metadata, "id": self.id, "prompt": self.prompt, "answer": self.answer}


class TaskTokenizer(Protocol):
    """The tokenizer surface the rest of the project relies on (char tokenizer or a checkpoint's)."""

    vocab_size: int
    pad_id: int
    eos_id: int
    stop_ids: frozenset[int]  # every id that ends a completion (eos plus e.g. a chat end-of-turn token)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class Task(Protocol):
    """A prompt source and a reward. Implemented by `ScoredTask`."""

    name: str
    tokenizer: TaskTokenizer

    def prompts(self, seed: int, shard_rank: int = 0, shard_count: int = 1) -> "PromptStream": ...

    def score(self, item: PromptItem, completion_ids: Sequence[int]) -> float: ...

    def score_batch(self, items: Sequence[PromptItem], completions: Sequence[Sequence[int]]) -> list[float]: ...

    def reward_stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


TASK_NAMES = ("sort", "math", "jsonl")


def build_task(cfg: "TaskConfig", seed: int, tokenizer_path: str | None = None) -> Task:
    """Build the configured task.

    `seed` fixes generated content (the sort task's digit strings); shuffling is seeded separately by
    `Task.prompts(seed, ...)`. `tokenizer_path` is the checkpoint directory whose tokenizer (and chat
    template) formats prompts for `math` and `jsonl`; the `sort` task always uses its own tokenizer.
    """
    # Imports are local so that a reward worker process (which imports this package) stays light.
    if cfg.name == "sort":
        from async_grpo.tasks.sort_task import build_sort_task

        return build_sort_task(cfg, seed)
    if cfg.name == "math":
        from async_grpo.tasks.math_task import build_math_task

        return build_math_task(cfg, tokenizer_path)
    if cfg.name == "jsonl":
        from async_grpo.tasks.file_task import build_file_task

        return build_file_task(cfg, tokenizer_path)
    from async_grpo.config import ConfigError

    raise ConfigError("task.name", cfg.name, f"one of {', '.join(TASK_NAMES)}")
