"""Any prompt file as a task (`task.name: jsonl`): JSONL or Parquet records, a user reward or exact match.

The prompt field is formatted by the checkpoint's tokenizer (chat template or raw text) when a
tokenizer path is given, else by the character tokenizer (for the built-in tiny models). Without
`task.reward`, a completion earns 1.0 when it equals the record's answer field (surrounding white
space ignored), so every record must then have one.
"""

from __future__ import annotations

from async_grpo.config import ConfigError, TaskConfig
from async_grpo.tasks.char_tokenizer import CharTokenizer
from async_grpo.tasks.hf_tokenizer import CheckpointTokenizer
from async_grpo.tasks.prompt_file import RecordPrompts, read_prompt_records
from async_grpo.tasks.reward_spec import RewardSpec
from async_grpo.tasks.scored_task import ScoredTask, reward_scorer


def exact_match_reward(prompt: str, completion: str, item: dict) -> float:
    return float(completion.strip() == str(item["answer"]).strip())


def build_file_task(cfg: TaskConfig, tokenizer_path: str | None) -> ScoredTask:
    if cfg.params:
        key = sorted(cfg.params)[0]
        raise ConfigError(f"task.params.{key}", cfg.params[key], "no params for task 'jsonl' (it takes none)")
    if cfg.path is None:
        raise ConfigError("task.path", None, "a JSONL or Parquet prompt file for task 'jsonl'")
    records = read_prompt_records(cfg.path, cfg.prompt_field, cfg.answer_field, require_answer=cfg.reward is None)
    if tokenizer_path is not None:
        tokenizer = CheckpointTokenizer(tokenizer_path, cfg.system_prompt, cfg.chat_template)
        format_prompt = tokenizer.format_prompt
    else:
        tokenizer = CharTokenizer()
        format_prompt = lambda text: [tokenizer.bos_id, *tokenizer.encode(text)]  # noqa: E731
    source = RecordPrompts(records, cfg.prompt_field, cfg.answer_field, format_prompt)
    builtin = RewardSpec(f"{__name__}:exact_match_reward")
    return ScoredTask("jsonl", tokenizer, source, reward_scorer(cfg, builtin))
