"""GSM8K-style math: `{"question": ..., "answer": "... #### 42"}` records, scored by final-answer equality.

Prompts are formatted by the checkpoint's tokenizer (chat template with the configured system prompt,
or raw text for base models). Reward = 1 when the completion's final answer (see math_answer) equals
the reference after `####`, else 0; plus `task.format_reward` when the final answer is marked in the
expected way (`task.params.answer_format`: "boxed" (default), "hash" for `#### 42`, "phrase" for
"the answer is 42"), so a format bonus can be earned by a wrong answer, never by an unmarked one.

Numeric references are decided by the project's exact parser. References it cannot read as a number
(`\\sqrt{2}`, `x+1`) go to math-verify when it is installed (`task.params.verifier`: "auto" uses it if
importable, "math_verify" requires it, "builtin" never uses it), else to normalised-text equality.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from async_grpo.config import ConfigError, TaskConfig
from async_grpo.tasks.hf_tokenizer import CheckpointTokenizer
from async_grpo.tasks.math_answer import (
    FinalAnswer,
    answers_equal,
    extract_final_answer,
    is_plain_number,
    reference_answer,
)
from async_grpo.tasks.prompt_file import RecordPrompts, read_prompt_records
from async_grpo.tasks.reward_spec import RewardSpec
from async_grpo.tasks.scored_task import ScoredTask, reward_scorer

MATH_PARAMS: dict[str, tuple[str, ...]] = {
    "answer_format": ("boxed", "hash", "phrase"),
    "verifier": ("auto", "builtin", "math_verify"),
}


def math_verify_installed() -> bool:
    return importlib.util.find_spec("math_verify") is not None


def _math_verify_equal(final: FinalAnswer, reference: str) -> bool:
    from math_verify import parse, verify

    span = f"\\boxed{{{final.text}}}" if final.style == "boxed" else final.text
    try:
        return bool(verify(parse(f"${reference}$"), parse(span)))
    except Exception:  # math-verify raises on some malformed LaTeX; an unreadable answer is not a match
        return False


def math_reward(
    prompt: str,
    completion: str,
    item: dict,
    *,
    format_reward: float = 0.0,
    answer_format: str = "boxed",
    verifier: str = "auto",
) -> float:
    """1.0 for a correct final answer, plus `format_reward` when it is marked as `answer_format`."""
    final = extract_final_answer(completion)
    if final is None:
        return 0.0
    reference = str(item["answer"])
    correct = answers_equal(final.text, reference)
    if not correct and verifier != "builtin" and not is_plain_number(reference) and math_verify_installed():
        correct = _math_verify_equal(final, reference)
    return float(correct) + (format_reward if final.style == answer_format else 0.0)


def math_params(params: dict[str, Any]) -> dict[str, str]:
    """`task.params` for the math task, defaults filled in; unknown keys and values are ConfigErrors."""
    resolved = {key: choices[0] for key, choices in MATH_PARAMS.items()}
    for key, value in params.items():
        if key not in MATH_PARAMS:
            raise ConfigError(f"task.params.{key}", value, f"one of the math task's params {sorted(MATH_PARAMS)}")
        if value not in MATH_PARAMS[key]:
            raise ConfigError(f"task.params.{key}", value, f"one of {list(MATH_PARAMS[key])}")
        resolved[key] = value
    if resolved["verifier"] == "math_verify" and not math_verify_installed():
        raise ConfigError(
            "task.params.verifier", "math_verify", "math-verify installed (pip install math-verify), or 'auto'"
        )
    return resolved


def build_math_task(cfg: TaskConfig, tokenizer_path: str | None) -> ScoredTask:
    params = math_params(cfg.params)
    if cfg.path is None:
        raise ConfigError("task.path", None, "a GSM8K-style JSONL or Parquet file for task 'math'")
    if tokenizer_path is None:
        raise ConfigError("model.path", None, "a checkpoint directory with a tokenizer for task 'math'")
    tokenizer = CheckpointTokenizer(tokenizer_path, cfg.system_prompt, cfg.chat_template)
    records = read_prompt_records(cfg.path, cfg.prompt_field, cfg.answer_field, require_answer=True)
    source = RecordPrompts(
        records,
        cfg.prompt_field,
        cfg.answer_field,
        tokenizer.format_prompt,
        answer_of=lambda raw: reference_answer(str(raw)),
    )
    builtin = RewardSpec(f"{__name__}:math_reward", {"format_reward": cfg.format_reward, **params})
    return ScoredTask("math", tokenizer, source, reward_scorer(cfg, builtin))
