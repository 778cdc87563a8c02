"""`async-grpo train CONFIG.yaml [key=value ...] [--resume]`: the product's entry point.

Under torchrun (one node or many) every process reads the same config, finds its role from its rank
(launch.py) and runs the learner loop or a rollout worker loop. Started without torchrun, the command
checks the config, then starts the local job itself through torchrun's own launcher (standalone
rendezvous on this host) with `learner.num_ranks + num_workers * workers.tp_size` processes.
Config errors are found before any process starts: exit code 2, one message.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from async_grpo.config import RunConfig, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=10")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from async_grpo import launch

    cfg = load_config(args.config, args.overrides)
    if launch.under_torchrun():
        layout = launch.plan_layout(cfg, int(os.environ["WORLD_SIZE"]))
        return _run_role(cfg, layout, resume=args.resume)
    world = launch.local_world_size(cfg)
    launch.plan_layout(cfg, world)
    _check_before_start(cfg)
    return _launch_local(args, world)


def _check_before_start(cfg: RunConfig) -> None:
    """Checks that need no process group: a missing model directory, a KV budget too small for one group."""
    from async_grpo.preflight import check_run_config

    check_run_config(cfg)


def _launch_local(args: argparse.Namespace, world: int) -> int:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
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
