"""Tasks: prompt sources and rewards (the embedded `sort` task, GSM8K-style `math`, any `jsonl` file).

Entry point: `build_task(cfg.task, seed, tokenizer_path)` -> `Task` (see base.py for the interface).
Kept light on purpose: reward worker processes import this package.
"""

from async_grpo.tasks.base import PromptItem, Task, TaskTokenizer, build_task

__all__ = ["PromptItem", "Task", "TaskTokenizer", "build_task"]
