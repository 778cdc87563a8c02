"""`async-grpo generate`: the rollout engine on its own, from a JSONL prompt file to a JSONL of completions.

    async-grpo generate --model DIR|preset:NAME --prompts FILE.jsonl --n G --max-new-tokens N --out FILE.jsonl
        [--temperature T] [--top-p P] [--top-k K] [--seed S] [--ignore-eos] [--block-size B]
        [--num-blocks M] [--attention auto|torch|triton|flash] [--dtype float32|bfloat16|float16]
        [--device cpu|cuda] [--stats FILE.json]

Input lines are `{"prompt_ids": [...]}` or `{"prompt": "text"}` (text needs a tokenizer in DIR).
Output: one line per prompt, in input order: `{"prompt_ids": [...], "completions": [{"token_ids": [...],
"logprobs": [...], "finish_reason": "stop"|"length"}, ...]}`. `--model preset:tiny` builds a random
model (seeded by --seed) so the command runs with no files at all. Bad input is a UsageError naming
the line or value (exit code 2, no traceback).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from async_grpo.config import KVConfig, ModelConfig, SamplingConfig

PRESET_PREFIX = "preset:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF checkpoint directory, or preset:NAME (random init)")
    parser.add_argument("--prompts", required=True, help='JSONL file: {"prompt_ids": [...]} or {"prompt": "text"}')
    parser.add_argument("--n", type=int, default=1, help="samples per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (and a preset's init seed)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV pool blocks (default: from kv.memory_gb)")
    parser.add_argument("--attention", default="auto", help="auto | torch | triton | flash (kv.attention)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--out", required=True, help="output JSONL, one line per prompt")
    parser.add_argument("--stats", default=None, help="write pool and token counts to this JSON file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from async_grpo.cli import UsageError

    dtype = _dtype(args.dtype, UsageError)
    device = _device(args.device, UsageError)
    sampling = _checked(
        lambda: SamplingConfig(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos,
        ),
        UsageError,
    )
    kv_cfg = _checked(
        lambda: KVConfig(block_size=args.block_size, num_blocks=args.num_blocks, attention=args.attention), UsageError
    )
    if args.n < 1:
        raise UsageError(f"--n {args.n}: expected at least 1 sample per prompt")

    model = _load_model(args.model, args.seed, device, dtype, UsageError)
    records = _read_prompts(Path(args.prompts), UsageError)
    tokenizer = None
    if any("prompt" in r for _, r in records):
        if args.model.startswith(PRESET_PREFIX):
            raise UsageError(f"{args.prompts}: text prompts need a tokenizer, and --model {args.model} has none")
        tokenizer = _load_tokenizer(args.model, UsageError)
    prompts = [
        _prompt_ids(r, lineno, args.prompts, tokenizer, model.args, sampling, UsageError) for lineno, r in records
    ]

    from async_grpo.workers.engine import GenerationEngine

    try:
        engine = GenerationEngine(model, kv_cfg, device, dtype)
        start = time.perf_counter()
        results = engine.generate(prompts, args.n, sampling, seed=args.seed)
        seconds = time.perf_counter() - start
    except ValueError as err:  # pool too small for one prompt, an unusable attention backend
        raise UsageError(str(err)) from None

    with open(args.out, "w") as f:
        for prompt, completions in zip(prompts, results):
            line: dict[str, Any] = {
                "prompt_ids": prompt,
                "completions": [
                    {"token_ids": c.token_ids, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
                    for c in completions
                ],
            }
            if tokenizer is not None:
                for out, c in zip(line["completions"], completions):
                    out["text"] = tokenizer.decode(c.token_ids)
            f.write(json.dumps(line) + "\n")
    stats = engine.last_stats
    if args.stats:
        Path(args.stats).write_text(json.dumps({
            "block_size": engine.pool.block_size,
            "num_blocks": engine.pool.num_blocks,
            "peak_blocks_in_use": stats.peak_blocks_in_use,
            "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.generated_tokens,
            "steps": stats.steps,
            "seconds": round(seconds, 4),
        }, indent=2) + "\n")
    print(
        f"generated {stats.generated_tokens} tokens for {len(prompts)} prompts x {args.n} in {seconds:.2f}s "
        f"({stats.generated_tokens / max(seconds, 1e-9):.0f} tok/s); peak KV blocks "
        f"{stats.peak_blocks_in_use}/{engine.pool.num_blocks}; wrote {args.out}"
    )
    return 0


def _checked(build, usage_error):
    try:
        return build()
    except ValidationError as err:
        first = err.errors()[0]
        key = "--" + str(first["loc"][0]).replace("_", "-")
        raise usage_error(f"{key} {first.get('input')!r}: {first['msg']}") from None


def _dtype(name: str, usage_error) -> torch.dtype:
    if name not in DTYPES:
        raise usage_error(f"--dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def _device(name: str | None, usage_error) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise usage_error(f"--device {name!r}: expected 'cpu' or 'cuda'")
    if name == "cuda" and not torch.cuda.is_available():
        raise usage_error("--device cuda: no CUDA device is available here")
    return torch.device(name)


def _load_model(spec: str, seed: int | None, device: torch.device, dtype: torch.dtype, usage_error):
    from async_grpo.model import build_model, load_pretrained

    if spec.startswith(PRESET_PREFIX):
        preset = spec[len(PRESET_PREFIX):]
        try:
            return build_model(ModelConfig(preset=preset, init_seed=seed or 0), device, dtype).eval()
        except (ValueError, ValidationError) as err:
            raise usage_error(f"--model {spec}: {err}") from None
    try:
        return load_pretrained(spec, dtype, device)
    except (FileNotFoundError, KeyError, ValueError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise usage_error(f"--model {spec}: {msg}") from None


def _load_tokenizer(path: str, usage_error):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError) as err:
        raise usage_error(
            f"--model {path}: text prompts need a tokenizer there, and loading it failed: {err}"
        ) from None


def _read_prompts(path: Path, usage_error) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise usage_error(f"--prompts {str(path)!r}: no such file")
    records = []
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise usage_error(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or ("prompt_ids" in record) == ("prompt" in record):
            raise usage_error(
                f'{path}:{lineno}: expected an object with exactly one of "prompt_ids" (token ids) or "prompt" (text)'
            )
        records.append((lineno, record))
    if not records:
        raise usage_error(f"--prompts {str(path)!r}: no prompts in the file")
    return records


def _prompt_ids(record, lineno, path, tokenizer, args, sampling: SamplingConfig, usage_error) -> list[int]:
    where = f"{path}:{lineno}"
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise usage_error(f'{where}: "prompt" = {record["prompt"]!r}: expected a string')
        ids = list(tokenizer(record["prompt"])["input_ids"])
    else:
        ids = record["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise usage_error(f'{where}: "prompt_ids" = {ids!r}: expected a list of integer token ids')
    if not ids:
        raise usage_error(f"{where}: the prompt is empty: expected at least one token")
    bad = [t for t in ids if not 0 <= t < args.vocab_size]
    if bad:
        raise usage_error(f"{where}: token ids {bad[:5]} are outside the model's vocabulary [0, {args.vocab_size})")
    total = len(ids) + sampling.max_new_tokens
    if total > args.max_position_embeddings:
        raise usage_error(
            f"{where}: {len(ids)} prompt tokens + --max-new-tokens {sampling.max_new_tokens} = {total} exceeds "
            f"the model's {args.max_position_embeddings} positions"
        )
    return ids
