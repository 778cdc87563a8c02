"""Prompts formatted with a checkpoint's tokenizer exactly as transformers' apply_chat_template does."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from async_grpo.config import ConfigError, TaskConfig  # noqa: E402
from async_grpo.tasks import build_task  # noqa: E402
from async_grpo.tasks.hf_tokenizer import CheckpointTokenizer  # noqa: E402

_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
_WORDS = [
    "what is two plus two ? natalia sold clips to her friends",
    "system user assistant you are a careful solver",
    "so the answer is 4 5",
]


def _save_tokenizer(path, chat_template: str | None, generation_eos: list[int] | None = None) -> str:
    """A word-level tokenizer trained on a few words, saved as a checkpoint's tokenizer files."""
    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    core.train_from_iterator(_WORDS, trainer=trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    if generation_eos is not None:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return str(path)


def _reference_ids(path: str, messages: list[dict]) -> list[int]:
    hf = AutoTokenizer.from_pretrained(path)
    rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def test_chat_prompt_matches_apply_chat_template_token_for_token(tmp_path):
    path = _save_tokenizer(tmp_path, _TEMPLATE)
    question = "what is two plus two ?"
    tok = CheckpointTokenizer(path)
    expected = _reference_ids(path, [{"role": "user", "content": question}])
    assert tok.format_prompt(question) == expected
    im_start, im_end = tok.hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert expected[0] == im_start and expected[-2] == im_start and im_end in expected  # the template was applied


def test_system_prompt_becomes_the_first_message(tmp_path):
    path = _save_tokenizer(tmp_path, _TEMPLATE)
    system = "you are a careful solver"
    tok = CheckpointTokenizer(path, system_prompt=system)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "natalia sold clips"}]
    expected = _reference_ids(path, messages)
    assert tok.format_prompt("natalia sold clips") == expected
    assert tok.hf.decode(expected).startswith("<|im_start|> system you are a careful solver <|im_end|>")


def test_base_model_prompt_is_raw_text_when_template_is_off_or_absent(tmp_path):
    with_template = _save_tokenizer(tmp_path / "chat", _TEMPLATE)
    without_template = _save_tokenizer(tmp_path / "base", None)
    raw = AutoTokenizer.from_pretrained(without_template)
    expected = raw.encode("you are a careful solver\n\nwhat is two plus two ?", add_special_tokens=True)
    base = CheckpointTokenizer(without_template, "you are a careful solver")
    assert base.format_prompt("what is two plus two ?") == expected
    off = CheckpointTokenizer(with_template, "you are a careful solver", use_chat_template=False)
    assert not off.uses_chat_template
    assert off.format_prompt("what is two plus two ?") == expected
    assert CheckpointTokenizer(without_template).format_prompt("two plus two") == raw.encode("two plus two")


def test_stop_ids_include_generation_config_eos_ids(tmp_path):
    path = _save_tokenizer(tmp_path, _TEMPLATE, generation_eos=[3, 5])
    tok = CheckpointTokenizer(path)
    assert tok.eos_id == 3 and tok.pad_id == 1
    assert tok.stop_ids == frozenset({3, 5})  # </s> and <|im_end|>


def test_math_task_formats_file_prompts_and_scores_up_to_the_end_of_turn(tmp_path):
    path = _save_tokenizer(tmp_path / "ckpt", _TEMPLATE, generation_eos=[3, 5])
    data = tmp_path / "gsm.jsonl"
    data.write_text(
        json.dumps({"question": "what is two plus two ?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4", "source": "hand"})
        + "\n\n"
        + json.dumps({"question": "natalia sold clips", "answer": "#### 1,000"})
        + "\n"
    )
    cfg = TaskConfig(name="math", path=str(data), system_prompt="you are a careful solver", format_reward=0.5)
    task = build_task(cfg, seed=0, tokenizer_path=path)
    item = task.source.item(0)
    assert (item.id, item.prompt, item.answer, item.metadata) == (0, "what is two plus two ?", "4", {"source": "hand"})
    messages = [
        {"role": "system", "content": "you are a careful solver"},
        {"role": "user", "content": "what is two plus two ?"},
    ]
    assert item.prompt_ids == _reference_ids(path, messages)
    assert task.source.item(1).answer == "1,000"
    hf = task.tokenizer.hf
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    right = hf.encode("so the answer is 4", add_special_tokens=False)
    wrong = hf.encode("so the answer is 5", add_special_tokens=False)
    assert task.completion_text(right + [im_end] + wrong) == "so the answer is 4"
    assert task.score_batch([item] * 3, [right + [im_end] + wrong, wrong + [im_end] + right, right]) == [1.0, 0.0, 1.0]
    shards = [task.prompts(seed=0, shard_rank=rank, shard_count=2) for rank in (0, 1)]
    assert sorted(next(shard).id for shard in shards) == [0, 1]


def test_math_task_needs_a_file_and_a_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match=r"'task.path' = None.*GSM8K-style"):
        build_task(TaskConfig(name="math"), seed=0, tokenizer_path=str(tmp_path))
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    with pytest.raises(ConfigError, match=r"'model.path' = None.*a checkpoint directory with a tokenizer"):
        build_task(TaskConfig(name="math", path=str(data)), seed=0)
    with pytest.raises(ValueError, match=r"tokenizer path .*expected a checkpoint directory with tokenizer.json"):
        build_task(TaskConfig(name="math", path=str(data)), seed=0, tokenizer_path=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match=r"task.params.answer_format' = 'latex'.*\['boxed', 'hash', 'phrase'\]"):
        build_task(TaskConfig(name="math", path=str(data), params={"answer_format": "latex"}), seed=0)
