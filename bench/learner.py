"""Learner throughput: tokens/s and model FLOPs utilisation of one GRPO step.

Times `Learner.step` on synthetic trajectories (random prompt and completion ids, behaviour logprobs
near the policy's, random advantages) for the "qwen2-0.5b" preset at 16k tokens per step, with and
without a reference forward (kl_beta > 0), under ZeRO-2 and ZeRO-3, one process per configuration
in turn. MFU = (6 N + 2 N if a reference forward runs) * tokens / time / 989e12 (H100/H200 dense bf16
peak), N = parameter count (a tied embedding counted once, as the lm_head matmul); attention's own
FLOPs are left out, so MFU is slightly understated. Medians over the timed steps after warm-up.

`--micro-batch-tokens`, `--fused-logprobs` and `--compile` take several values; every combination is
timed in turn (one row each), so the unfused eager path and the fused compiled one compare in one run.

    python bench/learner.py                 # GPU: qwen2-0.5b, 16384 tokens/step
    python bench/learner.py --zero 2 --no-reference --micro-batch-tokens 8192 16384 \
        --fused-logprobs off on --compile off on
    python bench/learner.py --tiny          # CPU smoke run: tiny preset, a few hundred tokens
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

PEAK_FLOPS = 989e12


@dataclass
class SyntheticTrajectory:
    """The fields the learner reads from a trajectory (no ZeroMQ stack needed to benchmark)."""

    prompt_ids: torch.Tensor  # [P] int32
    completion_ids: torch.Tensor  # [C] int32
    behaviour_logprobs: torch.Tensor  # [C] fp32
    advantage: float

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def synthetic_step(vocab: int, tokens_per_step: int, seq_len: int, prompt_len: int,
                   seed: int) -> list[SyntheticTrajectory]:
    gen = torch.Generator().manual_seed(seed)
    count = max(tokens_per_step // seq_len, 1)
    completion = seq_len - prompt_len
    return [
        SyntheticTrajectory(
            prompt_ids=torch.randint(0, vocab, (prompt_len,), generator=gen, dtype=torch.int32),
            completion_ids=torch.randint(0, vocab, (completion,), generator=gen, dtype=torch.int32),
            behaviour_logprobs=-torch.rand(completion, generator=gen) * 12.0,
            advantage=float(torch.randn((), generator=gen)),
        )
        for _ in range(count)
    ]


SWITCH = {"auto": "auto", "on": True, "off": False}


@dataclass
class Variant:
    """One timed configuration of the learner."""

    zero_stage: int
    with_reference: bool
    micro_batch_tokens: int
    fused_logprobs: str  # auto | on | off
    compile: str  # auto | on | off
    chunk_mb: int  # learner.logprob_chunk_mb
    grad_checks: str  # learner.fused_grad_checks: on | off


def run_one(args: argparse.Namespace, variant: Variant) -> dict[str, object]:
    from async_grpo.config import RunConfig
    from async_grpo.learner.engine import Learner
    from async_grpo.model.build import build_model

    cfg = RunConfig.model_validate({
        "model": {"preset": args.preset},
        "sampling": {"max_new_tokens": args.seq_len - args.prompt_len},
        "learner": {"zero_stage": variant.zero_stage, "lr": 1e-6, "micro_batch_tokens": variant.micro_batch_tokens,
                    "device": args.device, "gradient_checkpointing": args.gradient_checkpointing,
                    "fused_logprobs": SWITCH[variant.fused_logprobs], "compile": SWITCH[variant.compile],
                    "logprob_chunk_mb": variant.chunk_mb, "fused_grad_checks": SWITCH[variant.grad_checks],
                    "loss": {"kl_beta": 0.01 if variant.with_reference else 0.0}},
    })
    model = build_model(cfg.model, device="cpu", dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    learner = Learner(cfg, model)
    vocab = model.args.vocab_size
    phases = PhaseTimer(learner) if args.phases and learner.device.type == "cuda" else None
    times, tokens = [], 0
    for step in range(args.warmup + args.steps):
        batch = synthetic_step(vocab, args.tokens_per_step, args.seq_len, args.prompt_len, seed=step)
        tokens = sum(t.num_tokens for t in batch)
        if learner.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        learner.step(batch)
        if learner.device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            if phases is not None:
                phases.keep()
        elif phases is not None:
            phases.drop()
    if args.profile and learner.device.type == "cuda":
        profile_steps(learner, args, vocab)
    if args.cprofile:
        cprofile_optimizer_step(learner, args, vocab)
    median = statistics.median(times)
    phase_text = phases.summary() if phases is not None else ""
    flops_per_token = (6 + (2 if variant.with_reference else 0)) * n_params
    fused, compiled = learner.fused_logprobs, learner.compiled
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if learner.device.type == "cuda" else float("nan")
    del learner, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if compiled:
        torch._dynamo.reset()  # the next configuration compiles its own layers from scratch
    return {"zero": variant.zero_stage, "ref": variant.with_reference, "mbt": variant.micro_batch_tokens,
            "fused": fused, "compiled": compiled, "params": n_params, "tokens": tokens, "step_s": median,
            "tokens_per_s": tokens / median, "mfu": flops_per_token * tokens / median / PEAK_FLOPS,
            "peak_mem_gib": peak_mem, "phases": phase_text}


class PhaseTimer:
    """Wall time of the step's parts (CUDA-synchronised): forward+loss, backward, optimiser step.

    Wraps the DeepSpeed engine's `forward`/`backward`/`step` on this instance only; the syncs it adds
    make the parts add up to slightly more than an untimed step.
    """

    def __init__(self, learner: object):
        self.totals: dict[str, list[float]] = {"backward": [], "optimizer": []}
        self.current = {"backward": 0.0, "optimizer": 0.0}
        engine = learner.engine
        for name, attr in (("backward", "backward"), ("optimizer", "step")):
            engine.__dict__[attr] = self._timed(name, getattr(engine, attr))

    def _timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            self.current[name] += time.perf_counter() - start
            return out
        return wrapper

    def keep(self) -> None:
        for name, value in self.current.items():
            self.totals[name].append(value)
        self.drop()

    def drop(self) -> None:
        self.current = {name: 0.0 for name in self.current}

    def summary(self) -> str:
        return " ".join(f"{name} {statistics.median(v):.3f}s" for name, v in self.totals.items() if v)


def profile_steps(learner: object, args: argparse.Namespace, vocab: int) -> None:
    """Two more steps under torch.profiler: where a step's GPU time goes, largest first."""
    from torch.profiler import ProfilerActivity, profile

    batches = [synthetic_step(vocab, args.tokens_per_step, args.seq_len, args.prompt_len, seed=1000 + i)
               for i in range(2)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in batches:
            learner.step(batch)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=60), flush=True)
    print_kernel_groups(prof, steps=len(batches))


def cprofile_optimizer_step(learner: object, args: argparse.Namespace, vocab: int) -> None:
    """One more step with the DeepSpeed engine's `step` (the optimiser phase) under cProfile: its host time."""
    import cProfile
    import pstats

    engine, profiler = learner.engine, cProfile.Profile()
    original = engine.step

    def profiled(*a, **kw):
        if learner.device.type == "cuda":
            torch.cuda.synchronize()
        profiler.enable()
        try:
            out = original(*a, **kw)
            if learner.device.type == "cuda":
                torch.cuda.synchronize()
            return out
        finally:
            profiler.disable()

    engine.__dict__["step"] = profiled
    try:
        learner.step(synthetic_step(vocab, args.tokens_per_step, args.seq_len, args.prompt_len, seed=2000))
    finally:
        engine.__dict__["step"] = original
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


KERNEL_GROUPS = (  # first match wins; lower-case substrings of CUDA kernel names
    ("attention (flash / sdpa)", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "matmul", "wgmma")),
    ("optimizer (multi-tensor)", ("multi_tensor", "adam")),
    ("compiled (triton)", ("triton",)),
    ("copy / cast", ("memcpy", "copy", "memset", "fill", "cast")),
    ("reduce / softmax / loss", ("reduce", "softmax", "logsumexp", "nll", "embedding", "index", "scatter", "gather")),
)


def print_kernel_groups(prof: object, steps: int) -> None:
    """Per-step GPU time by kind of kernel (the profile's device events, self time)."""
    groups: dict[str, float] = {}
    for evt in prof.key_averages():
        device_us = getattr(evt, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(evt, "self_cuda_time_total", 0.0)
        # Kernels only: host-side rows (ops, launches, inductor's wrappers) carry their kernels' device time
        # too, and a compiled kernel's launch row has the kernel's own name.
        if not device_us or evt.cpu_time_total > 0:
            continue
        name = evt.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + device_us
    total = sum(groups.values())
    print(f"GPU time per step by kernel kind ({total / steps / 1e3:.1f} ms of kernels):")
    for group, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {group:32s} {us / steps / 1e3:8.2f} ms  {us / total:6.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny preset, few tokens")
    parser.add_argument("--preset", default="qwen2-0.5b")
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--micro-batch-tokens", type=int, nargs="+", default=[8192],
                        help="token budget of a micro-batch; 16384 = the whole default step in one")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--zero", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-reference", action="store_true", help="time only steps without a reference forward")
    parser.add_argument("--only-reference", action="store_true", help="time only steps with a reference forward")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table (GPU)")
    parser.add_argument("--fused-logprobs", nargs="+", choices=sorted(SWITCH), default=["auto"],
                        help="learner.fused_logprobs: lm_head + logprobs on completion rows only")
    parser.add_argument("--compile", nargs="+", choices=sorted(SWITCH), default=["auto"],
                        help="learner.compile: torch.compile of every decoder layer")
    parser.add_argument("--logprob-chunk-mb", type=int, nargs="+", default=[1024],
                        help="learner.logprob_chunk_mb: fp32 MiB of one lm_head chunk on the fused path")
    parser.add_argument("--fused-grad-checks", nargs="+", choices=["on", "off"], default=["on"],
                        help="learner.fused_grad_checks: DeepSpeed's overflow check and norm as multi-tensor kernels")
    parser.add_argument("--cprofile", action="store_true",
                        help="also print a cProfile of one optimiser phase (DeepSpeed's engine.step)")
    parser.add_argument("--phases", action="store_true",
                        help="also time backward and the optimiser step apart (GPU; adds syncs)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset, args.tokens_per_step, args.seq_len, args.prompt_len = "tiny", 256, 32, 8
        args.micro_batch_tokens, args.warmup, args.steps, args.device = [128], 1, 2, "cpu"
    if args.device == "cpu" or not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(f"{'zero':>4} {'ref':>5} {'mbt':>6} {'fused':>5} {'compile':>7} {'params':>12} {'tokens':>7} "
          f"{'step_s':>8} {'tokens/s':>10} {'MFU':>7} {'mem_GiB':>8} {'chunkMB':>6} {'checks':>6}")
    if args.no_reference and args.only_reference:
        parser.error("--no-reference and --only-reference exclude each other")
    references = (False,) if args.no_reference else (True,) if args.only_reference else (False, True)
    for zero_stage, with_reference, mbt, fused, compiled, chunk_mb, checks in itertools.product(
            args.zero, references, args.micro_batch_tokens, args.fused_logprobs, args.compile,
            args.logprob_chunk_mb, args.fused_grad_checks):
        r = run_one(args, Variant(zero_stage, with_reference, mbt, fused, compiled, chunk_mb, checks))
        print(f"{r['zero']:>4} {str(r['ref']):>5} {r['mbt']:>6} {str(r['fused']):>5} {str(r['compiled']):>7} "
              f"{r['params']:>12,} {r['tokens']:>7} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.0f} {r['mfu']:>7.2%} "
              f"{r['peak_mem_gib']:>8.1f} {chunk_mb:>6} {checks:>6} {r['phases']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    raise SystemExit(main())
