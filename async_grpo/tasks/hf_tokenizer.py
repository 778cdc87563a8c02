"""A checkpoint's own tokenizer (transformers AutoTokenizer, local files only) and prompt formatting.

Prompts for chat models go through the checkpoint's chat template exactly as
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` renders them, with the configured
system prompt as a first `system` message. Base models (no template, or `task.chat_template: false`)
get the raw text, with the system prompt as a first paragraph and the tokenizer's usual special tokens
(e.g. BOS). Stop ids are the tokenizer's EOS plus any `eos_token_id` in the checkpoint's
generation_config.json (chat models end a turn with their own token, e.g. `<|im_end|>`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence


class CheckpointTokenizer:
    """Wraps a transformers tokenizer loaded from `path`; implements `TaskTokenizer` plus `format_prompt`."""

    def __init__(self, path: str, system_prompt: str | None = None, use_chat_template: bool = True):
        if not Path(path, "tokenizer_config.json").is_file() and not Path(path, "tokenizer.json").is_file():
            raise ValueError(
                f"tokenizer path {path!r}: expected a checkpoint directory with tokenizer.json or tokenizer_config.json"
            )
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.system_prompt = system_prompt
        self.uses_chat_template = bool(use_chat_template and getattr(self.hf, "chat_template", None))
        self.vocab_size = len(self.hf)
        if self.hf.eos_token_id is None:
            raise ValueError(f"tokenizer at {path!r} has no eos_token: expected one, it ends every completion")
        self.eos_id = int(self.hf.eos_token_id)
        self.pad_id = int(self.hf.pad_token_id) if self.hf.pad_token_id is not None else self.eos_id
        self.stop_ids = frozenset({self.eos_id, *_generation_eos_ids(Path(path))})

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def format_prompt(self, prompt: str) -> list[int]:
        """Token ids of one prompt, ready for prefill (template and special tokens applied)."""
        if self.uses_chat_template:
            messages: list[dict[str, Any]] = []
            if self.system_prompt:
                messages.append({"role": "system", "content": self.system_prompt})
            messages.append({"role": "user", "content": prompt})
            rendered = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            # transformers 5 returns a BatchEncoding here, 4.x a plain list.
            ids = rendered["input_ids"] if isinstance(rendered, Mapping) or hasattr(rendered, "input_ids") else rendered
            return [int(t) for t in ids]
        text = f"{self.system_prompt}\n\n{prompt}" if self.system_prompt else prompt
        return list(self.hf.encode(text, add_special_tokens=True))


def _generation_eos_ids(path: Path) -> list[int]:
    config = path / "generation_config.json"
    if not config.is_file():
        return []
    eos = json.loads(config.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]
