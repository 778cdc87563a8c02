"""`async-grpo train CONFIG.yaml [key=value ...] [--resume]`: the product's entry point.

Under torchrun (one node or many) every process reads the same config, finds its role from its rank
(launch.py) and runs the learner loop or a rollout worker loop. Started without torchrun, the command
checks the config, then starts the local job itself through torchrun's own launcher (standalone
rendezvous on this host) with `learner.num_ranks + num_workers * workers.tp_size` processes.
Config errors are found before any process starts: exit code 2, one message.

Recovery from a lost process: `--max-restarts N` (local launch) is handed to torchrun, which then
restarts the whole job up to N times when any process dies (a killed rollout worker, a crashed
learner). A restarted job resumes by itself: under torchrun, `TORCHELASTIC_RESTART_COUNT > 0` means
this is a restart and the command behaves as if `--resume` had been given, so the learner continues
from its newest complete checkpoint (optimiser state, data position, policy version) and steps after
that checkpoint are redone and logged once. On a cluster pass `--max-restarts` to torchrun directly.
Every process writes its pid to `out_dir/pids/rank<r>.pid` (job.py), so tools can find a role's process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from async_grpo.config import ConfigError, RunConfig, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=10")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument(
        "--max-restarts", type=int, default=0, metavar="N",
        help="local launch: let torchrun restart the job up to N times after a process dies (each restart resumes)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from async_grpo import launch

    cfg = load_config(args.config, args.overrides)
    if args.max_restarts < 0:
        raise ConfigError("--max-restarts", args.max_restarts, "a count >= 0", "command line")
    if launch.under_torchrun():
        layout = launch.plan_layout(cfg, int(os.environ["WORLD_SIZE"]))
        # Each rank checks too (a cluster job never passes through the local launcher): exit 2 before any group.
        _check_before_start(cfg)
        return _run_role(cfg, layout, resume=args.resume or restarted_by_torchrun())
    world = launch.local_world_size(cfg)
    launch.plan_layout(cfg, world)
    _check_before_start(cfg)
    return _launch_local(args, world)


def restarted_by_torchrun() -> bool:
    """True in a job torchrun has restarted after a failure: such a job resumes from its checkpoint."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def _check_before_start(cfg: RunConfig) -> None:
    """Checks that need no process group: a missing model directory, a KV budget too small for one group."""
    from async_grpo.preflight import check_run_config

    check_run_config(cfg)


def _launch_local(args: argparse.Namespace, world: int) -> int:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
        f"--max-restarts={args.max_restarts}",
        "-m", "async_grpo", "train", args.config, *args.overrides,
    ]
    if args.resume:
        cmd.append("--resume")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, env=env)
    return proc.returncode


def _run_role(cfg: RunConfig, layout, resume: bool) -> int:
    from async_grpo.job import run_job

    return run_job(cfg, layout, resume=resume)
