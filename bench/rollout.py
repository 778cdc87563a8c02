"""Rollout throughput: the generation engine against Hugging Face `generate()` on the same model and prompts.

One model (the "qwen2-0.5b" preset, random weights, bf16 on one GPU) runs through both, in one
process: `transformers` gets the very same weights through our `save_pretrained` (a temporary HF
checkpoint directory). Every case samples `samples` completions for each of `prompts` random prompts
of `prompt_len` tokens, exactly `new_tokens` new tokens each (EOS ignored), temperature 1. Printed per
case, as a markdown table row: tokens/s of each (generated tokens / wall time, medians over
--repeats after a warm-up run), their ratio, and the engine's peak KV blocks against the blocks a
dense cache would hold (one row of prompt + new tokens per sample, rounded up to whole blocks).

Cases (`--cases`, comma-separated; default the first three):
    16x16     16 prompts x 16 samples, 256-token prompts, 256 new tokens (the goal: >= 20x HF)
    8x8       8 prompts x 8 samples, 256 + 256
    32x16-1k  32 prompts x 16 samples, 1,024-token prompts, 256 new tokens
    16x16-4k  16 prompts x 16 samples, 4,096-token prompts, 256 new tokens (where the Gluon prefix kernel runs)

`--shared-prefix on|off|both` sets the engine's `kv.shared_prefix` (default auto); `both` times the
engine once with the shared-prefix decode path and once without, one row each (HF runs once per case).
`--fused-ops on|off|both` sets `kv.fused_decode_ops` (default auto: on with CUDA, as in the engine) the same way: the generation forward
through the fused kernels of model/fused_ops.py (fused q|k|v and gate|up GEMMs, add + RMSNorm, RoPE,
SwiGLU) or the eager layers. With both flags at `both`, every combination gets a row.

    python bench/rollout.py                       # GPU, all cases
    python bench/rollout.py --cases 16x16 --also-eager --repeats 3
    python bench/rollout.py --cases 32x16-1k --shared-prefix both --no-hf
    python bench/rollout.py --cases 16x16 --fused-ops both --repeats 3 --hf-repeats 1
    python bench/rollout.py --quick               # tiny preset on CPU in seconds (smoke test)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from async_grpo.config import KVConfig, ModelConfig, SamplingConfig
from async_grpo.model import build_model
from async_grpo.model.hf_io import save_pretrained
from async_grpo.workers.engine import GenerationEngine


@dataclass(frozen=True)
class Case:
    name: str
    prompts: int
    samples: int
    prompt_len: int
    new_tokens: int


CASES = {
    "16x16": Case("16x16", 16, 16, 256, 256),
    "8x8": Case("8x8", 8, 8, 256, 256),
    "32x16-1k": Case("32x16-1k", 32, 16, 1024, 256),
    "16x16-4k": Case("16x16-4k", 16, 16, 4096, 256),
}
DEFAULT_CASES = ("16x16", "8x8", "32x16-1k")
QUICK = Case("quick", 2, 2, 12, 8)  # with block size 4: 3 shared prompt blocks per prompt


@dataclass
class Result:
    case: str
    hf_tok_s: float | None
    engine_tok_s: float
    eager_tok_s: float | None
    peak_blocks: int
    dense_blocks: int
    graph_steps: int
    decode_steps: int
    shared_prefix: str = "auto"  # the engine's kv.shared_prefix
    shared_steps: int = 0  # decode steps that took the shared-prefix path
    fused_ops: bool = False  # the engine's kv.fused_decode_ops

    @property
    def speedup(self) -> float | None:
        return None if self.hf_tok_s is None else self.engine_tok_s / self.hf_tok_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompts(case: Case, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(case.prompt_len)] for _ in range(case.prompts)]


def blocks_needed(case: Case, block_size: int) -> int:
    """Every group admitted at once: its worst case (workers/scheduler.py) summed over the prompts."""
    shared = case.prompt_len // block_size
    own = -(-(case.prompt_len + case.new_tokens - 1) // block_size) - shared
    return case.prompts * (shared + case.samples * own)


def dense_blocks(case: Case, block_size: int) -> int:
    return case.prompts * case.samples * -(-(case.prompt_len + case.new_tokens) // block_size)


def hf_model(model, dtype: torch.dtype, device: torch.device):
    """The transformers model holding `model`'s weights (written and read back as an HF checkpoint)."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as path:
        save_pretrained(model, model.args, path, dtype=dtype)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None  # ignore EOS: exactly max_new_tokens for every sample
    return hf


def hf_generate(hf, prompts: list[list[int]], case: Case, device: torch.device) -> int:
    ids = torch.tensor(prompts, device=device)  # [B, P]; equal lengths, so no padding
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            num_return_sequences=case.samples,
            max_new_tokens=case.new_tokens,
            pad_token_id=0,
        )  # [B * G, P + new]
    generated = out.shape[0] * (out.shape[1] - case.prompt_len)
    assert generated == case.prompts * case.samples * case.new_tokens, f"HF generated {generated} tokens"
    return generated


def engine_generate(engine: GenerationEngine, prompts: list[list[int]], case: Case, seed: int) -> int:
    params = SamplingConfig(temperature=1.0, max_new_tokens=case.new_tokens, ignore_eos=True)
    results = engine.generate(prompts, case.samples, params, seed=seed)
    generated = sum(len(c.token_ids) for group in results for c in group)
    assert generated == case.prompts * case.samples * case.new_tokens, f"engine generated {generated} tokens"
    return generated


def median_tok_s(run, device: torch.device, repeats: int) -> float:
    """Median over `repeats` calls of run() -> tokens generated, per second of wall time."""
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        tokens = run()
        sync(device)
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def run_case(case: Case, model, hf, device: torch.device, dtype: torch.dtype, args,
             shared_prefix: str = "auto", hf_rate: float | None = None, fused_ops: bool = False) -> Result:
    """Time the engine (and HF, unless `hf_rate` is already known) on `case`."""
    prompts = random_prompts(case, model.args.vocab_size, seed=case.prompts * 1000 + case.prompt_len)
    kv = KVConfig(block_size=args.block_size, num_blocks=blocks_needed(case, args.block_size),
                  cuda_graph_max_rows=max(1, case.prompts * case.samples), shared_prefix=shared_prefix,
                  attention=args.attention, fused_decode_ops=fused_ops)

    def measure(cuda_graphs: bool) -> tuple[float, GenerationEngine]:
        engine = GenerationEngine(model, kv.model_copy(update={"cuda_graphs": cuda_graphs}), device, dtype)
        engine_generate(engine, prompts, case, seed=0)  # warm-up: kernels compiled, allocator settled
        rate = median_tok_s(lambda: engine_generate(engine, prompts, case, seed=1), device, args.repeats)
        return rate, engine

    engine_rate, engine = measure(cuda_graphs=not args.no_graphs)
    stats = engine.last_stats
    peak = stats.peak_blocks_in_use
    del engine
    gc.collect()  # the engine and its graphs reference each other: free its pool before the next one
    eager_rate = measure(cuda_graphs=False)[0] if args.also_eager and not args.no_graphs else None
    if hf is not None and hf_rate is None:
        warm = Case(case.name, 1, 1, case.prompt_len, 4)
        hf_generate(hf, prompts[:1], warm, device)
        hf_rate = median_tok_s(lambda: hf_generate(hf, prompts, case, device), device, args.hf_repeats or args.repeats)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Result(case.name, hf_rate, engine_rate, eager_rate, peak, dense_blocks(case, args.block_size),
                  stats.graph_steps, stats.decode_steps, shared_prefix, stats.shared_prefix_steps, fused_ops)


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(results: list[Result], cases: dict[str, Case], also_eager: bool) -> str:
    head = ["case", "prompts x samples", "prompt + new", "HF tok/s", "engine tok/s"]
    head += ["eager engine tok/s"] if also_eager else []
    head += ["engine / HF", "peak KV blocks", "dense KV blocks", "graph steps", "shared prefix", "shared steps",
             "fused ops"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        c = cases[r.case]
        row = [r.case, f"{c.prompts} x {c.samples}", f"{c.prompt_len} + {c.new_tokens}", fmt(r.hf_tok_s, ",.0f"),
               fmt(r.engine_tok_s, ",.0f")]
        row += [fmt(r.eager_tok_s, ",.0f")] if also_eager else []
        row += [fmt(r.speedup, ".1f") + ("x" if r.speedup else ""), str(r.peak_blocks), str(r.dense_blocks),
                f"{r.graph_steps}/{r.decode_steps}", r.shared_prefix, f"{r.shared_steps}/{r.decode_steps}",
                "on" if r.fused_ops else "off"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, from {list(CASES)}")
    parser.add_argument("--quick", action="store_true", help="tiny preset on CPU, a few tokens (smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--hf-repeats", type=int, default=None, help="timed HF runs (default: --repeats)")
    parser.add_argument("--block-size", type=int, default=None, help="KV block size (default 16; 4 with --quick)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers generate()")
    parser.add_argument("--no-graphs", action="store_true", help="engine without CUDA graphs")
    parser.add_argument("--also-eager", action="store_true", help="also time the engine without CUDA graphs")
    parser.add_argument("--shared-prefix", default="auto", choices=("auto", "on", "off", "both"),
                        help="kv.shared_prefix of the engine; both: one timed row with it on, one with it off")
    parser.add_argument("--fused-ops", default="auto", choices=("auto", "on", "off", "both"),
                        help="kv.fused_decode_ops of the engine; both: one timed row with it on, one with it off")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: expected at least 1")
    modes = ["on", "off"] if args.shared_prefix == "both" else [args.shared_prefix]
    fused_modes = {"auto": [torch.cuda.is_available() and not args.quick], "on": [True], "off": [False],
                   "both": [False, True]}[args.fused_ops]
    # On CPU only the Triton interpreter runs the shared-prefix kernel; elsewhere "auto" picks the backend.
    args.attention = "auto"
    if args.quick and args.shared_prefix in ("on", "both"):
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            parser.error(f"--quick --shared-prefix {args.shared_prefix} runs the Triton kernels on CPU: "
                         "set TRITON_INTERPRET=1")
        args.attention = "triton"
    # On plain CPU the fused ops run their torch references; under TRITON_INTERPRET=1 their kernels.

    if args.block_size is None:
        args.block_size = 4 if args.quick else 16
    if args.quick:
        device, dtype, preset = torch.device("cpu"), torch.float32, "tiny"
        cases = {QUICK.name: QUICK}
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: the rollout benchmark needs one (try --quick for a CPU smoke run)", file=sys.stderr)
            return 2
        device, dtype, preset = torch.device("cuda"), torch.bfloat16, "qwen2-0.5b"
        unknown = [c for c in args.cases.split(",") if c not in CASES]
        if unknown:
            parser.error(f"--cases: unknown {unknown}; expected names from {list(CASES)}")
        cases = {c: CASES[c] for c in args.cases.split(",")}

    model = build_model(ModelConfig(preset=preset, dtype="float32" if args.quick else "bfloat16"), device, dtype)
    model.eval()
    hf = None if args.no_hf else hf_model(model, dtype, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"model {preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {dtype}) on {name}; "
          f"block size {args.block_size}; medians over {args.repeats} run(s)", flush=True)

    results = []
    for case in cases.values():
        hf_rate = None
        for mode in modes:
            for fused in fused_modes:
                results.append(run_case(case, model, hf, device, dtype, args, mode, hf_rate, fused))
                hf_rate = results[-1].hf_tok_s
                print(table(results[-1:], cases, args.also_eager).splitlines()[-1], flush=True)
    print()
    print(table(results, cases, args.also_eager))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"speedup": r.speedup} for r in results], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
