"""Asynchronous against synchronous GRPO on the same hardware and config: what overlapping buys.

Runs `async-grpo train CONFIG` twice, `mode=async` and `mode=sync` (the same code; sync generates a
step's batch, then trains on it, then generates with the new weights), and reads each run's
metrics.jsonl. Reported per mode, over the steps after `--warmup`:
  samples/s   trajectories trained on per second of wall time
  T_gen       sync run: median time the learner waits for a step's batch (generation + scoring)
  T_train     median learner step time (forward, backward, optimiser)
and the measured async/sync speed-up against the ideal (T_gen + T_train) / max(T_gen, T_train), the
most that overlapping generation with training can give.

    python bench/pipeline.py configs/local.yaml --steps 40
    python bench/pipeline.py configs/single_gpu.yaml --steps 30 trainer.max_steps=30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_mode(config: str, mode: str, steps: int, overrides: list[str], out_root: Path) -> dict:
    out_dir = out_root / mode
    cmd = [sys.executable, "-m", "async_grpo", "train", config, f"mode={mode}", f"trainer.max_steps={steps}",
           "trainer.save_every=0", f"out_dir={out_dir}", *overrides]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "wall_s": time.monotonic() - started}


def summarize(rows: list[dict], warmup: int) -> dict:
    body = rows[warmup:]
    if len(body) < 2:
        sys.exit(f"need more than {warmup + 1} steps to measure (got {len(rows)})")
    span = body[-1]["elapsed_s"] - body[0]["elapsed_s"]
    samples = sum(r["sequences"] for r in body[1:])  # samples consumed between the first and last timestamps
    return {
        "samples_per_s": samples / span,
        "t_gen": statistics.median(r["wait_s"] for r in body),
        "t_train": statistics.median(r["train_s"] for r in body),
        "t_sync": statistics.median(r["sync_s"] for r in body),
        "staleness_mean": statistics.mean(r["staleness_mean"] for r in body),
        "reward_last": statistics.mean(r["reward_mean"] for r in rows[-5:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {mode: summarize(run_mode(args.config, mode, args.steps, args.overrides, Path(tmp))["rows"], args.warmup)
                  for mode in ("sync", "async")}
    sync, asyn = result["sync"], result["async"]
    t_gen, t_train = sync["t_gen"], sync["t_train"]
    ideal = (t_gen + t_train) / max(t_gen, t_train)
    print(f"config {args.config} {' '.join(args.overrides)}  steps {args.steps} (first {args.warmup} not timed)")
    print("| mode | samples/s | T_gen (s) | T_train (s) | T_sync (s) | mean staleness | reward (last 5) |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("sync", "async"):
        r = result[mode]
        print(f"| {mode} | {r['samples_per_s']:.1f} | {r['t_gen']:.3f} | {r['t_train']:.3f} | {r['t_sync']:.3f} "
              f"| {r['staleness_mean']:.2f} | {r['reward_last']:.3f} |")
    print(f"async/sync speed-up: {asyn['samples_per_s'] / sync['samples_per_s']:.2f}x  "
          f"(ideal (T_gen + T_train) / max(T_gen, T_train) = {ideal:.2f}x)")


if __name__ == "__main__":
    main()
