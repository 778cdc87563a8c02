"""`async-grpo generate` as a user runs it: a subprocess, JSONL in and out, exit 2 on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

WORDS = ["<unk>", "<eos>", "the", "cat", "sat", "on", "mat", "a", "dog"]
TIMEOUT_S = 120


def cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "async_grpo", "generate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, out, err


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, object]:
    """A tiny Llama with a word-level tokenizer, saved as a Hugging Face directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, eos_token_id=None, bos_token_id=None,
    )).eval()
    hf.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    return path, hf


def test_generate_writes_completions_and_stats(checkpoint, tmp_path):
    path, hf = checkpoint
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt_ids": [2, 3, 4]}, {"prompt": "the dog sat on a"}])
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    preset_out = tmp_path / "preset.jsonl"
    procs = [
        cli("--model", str(path), "--prompts", str(prompts), "--n", "2", "--max-new-tokens", "5", "--temperature",
            "0", "--ignore-eos", "--block-size", "4", "--num-blocks", "16", "--out", str(out), "--stats", str(stats)),
        cli("--model", "preset:tiny", "--prompts", str(write_jsonl(tmp_path / "q.jsonl", [{"prompt_ids": [1, 2]}])),
            "--n", "3", "--max-new-tokens", "4", "--seed", "5", "--top-k", "10", "--out", str(preset_out)),
    ]
    results = [finish(p) for p in procs]
    for code, _, err in results:
        assert code == 0, err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt_ids"] for x in lines] == [[2, 3, 4], [2, 8, 4, 5, 7]]  # text went through the tokenizer
    for line in lines:
        ids = line["prompt_ids"]
        expected = hf.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=0)[0, len(ids):]
        assert len(line["completions"]) == 2
        for c in line["completions"]:
            assert c["token_ids"] == expected.tolist()
            assert c["finish_reason"] == "length" and len(c["logprobs"]) == 5
            assert c["text"] == " ".join(WORDS[t] for t in c["token_ids"])
    written = json.loads(stats.read_text())
    # P=3: 0 shared + 2 * ceil(7/4) = 4; P=5: 1 shared + 2 * (ceil(9/4) - 1) = 5.
    assert {k: written[k] for k in ("block_size", "num_blocks", "peak_blocks_in_use", "prompt_tokens",
                                    "generated_tokens")} == {
        "block_size": 4, "num_blocks": 16, "peak_blocks_in_use": 9, "prompt_tokens": 8, "generated_tokens": 20}
    preset_lines = [json.loads(x) for x in preset_out.read_text().splitlines()]
    assert len(preset_lines) == 1 and len(preset_lines[0]["completions"]) == 3
    assert all(len(c["token_ids"]) == 4 for c in preset_lines[0]["completions"])


@pytest.mark.slow
def test_bad_input_exits_2_with_a_message_and_no_traceback(checkpoint, tmp_path):
    path, _ = checkpoint
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt_ids": [2, 3]}])
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((path / "config.json").read_text())
    cases = {
        "malformed": (["--prompts", str(write_jsonl(tmp_path / "bad.jsonl", [{"prompt_ids": [1]}, "{oops"]))],
                      "bad.jsonl:2: not valid JSON"),
        "empty": (["--prompts", str(write_jsonl(tmp_path / "empty.jsonl", [{"prompt_ids": []}]))],
                  "empty.jsonl:1: the prompt is empty"),
        "too_long": (["--prompts", str(write_jsonl(tmp_path / "long.jsonl", [{"prompt_ids": [2] * 30}]))],
                     "long.jsonl:1: 30 prompt tokens + --max-new-tokens 4 = 34 exceeds the model's 32 positions"),
        "dtype": (["--prompts", str(good), "--dtype", "float64"], "--dtype 'float64': expected one of"),
        "no_model_dir": (["--prompts", str(good), "--model", str(tmp_path / "nowhere")], "does not exist"),
        "no_weights": (["--prompts", str(good), "--model", str(no_weights)],
                       "has no weights: expected model.safetensors"),
        "no_prompts": (["--prompts", str(tmp_path / "missing.jsonl")], "missing.jsonl': no such file"),
        "pool": (["--prompts", str(good), "--num-blocks", "1", "--block-size", "2"], "but the pool has 1"),
    }
    procs = {}
    for name, (args, _) in cases.items():
        argv = ["--model", str(path), "--max-new-tokens", "4", "--out", str(tmp_path / f"{name}.out"), *args]
        procs[name] = cli(*argv)
    for name, proc in procs.items():
        code, _, err = finish(proc)
        assert code == 2, f"{name}: exit {code}, stderr {err!r}"
        assert "Traceback" not in err, f"{name}: {err}"
        assert err.startswith("async-grpo generate: error: "), f"{name}: {err!r}"
        assert cases[name][1] in err, f"{name}: {err!r}"
