"""End to end on CPU: `async-grpo train` as users run it, through torchrun, with real processes.

Every run here is a real job: gloo process groups, ZeroMQ sockets on 127.0.0.1, DeepSpeed ZeRO on the
learner rank, weight broadcasts on the sync groups. Runs are kept to a few steps of the tiny model;
the one that checks learning runs the embedded default as the README does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from async_grpo.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "async_grpo"]
# A small, quick variant of the embedded default.
SMALL = [
    "trainer.max_steps=4", "trainer.save_every=0", "learner.samples_per_step=64",
    "workers.prompts_per_batch=4", "workers.group_size=8",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train(out_dir: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [*CLI, "train", str(ROOT / "configs/local.yaml"), f"out_dir={out_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_async_run_with_two_worker_groups_one_tensor_parallel(tmp_path):
    out = tmp_path / "run"
    proc = _train(out, *SMALL, "workers.group_tp_sizes=[1,2]", "max_staleness=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Every consumed trajectory was within max_staleness (the per-step maximum is logged).
    assert all(0 <= r["staleness_max"] <= 2 for r in rows)
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4]
    # Each worker group received new weights beyond the initial version 0 at least once.
    last = rows[-1]
    assert last["synced_version/sync-0"] >= 1 and last["synced_version/sync-1"] >= 1
    assert last["sync_groups_dead"] == 0 and last["rejected_messages"] == 0
    # The final policy is a Hugging Face checkpoint that transformers loads.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "final")
    assert sum(p.numel() for p in hf.parameters()) > 0
    assert (out / "reward.png").is_file() and (out / "endpoints.json").is_file()


@pytest.mark.slow
def test_two_learner_ranks_share_each_step_and_resume_from_their_checkpoint(tmp_path):
    """ZeRO-2 over 2 learner ranks: rank 0's trajectories reach both ranks; a resumed run goes on at step 5."""
    out = tmp_path / "run"
    two = [*SMALL, "learner.num_ranks=2", "trainer.save_every=2"]
    first = _train(out, *two)
    assert first.returncode == 0, first.stderr[-4000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    resumed = _train(out, *two, "trainer.max_steps=6", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # Every step trained on the whole step's samples, split over the two ranks.
    assert all(r["sequences"] == 64 for r in rows)


@pytest.mark.slow
def test_sync_mode_trains_only_on_the_current_policy(tmp_path):
    out = tmp_path / "run"
    proc = _train(out, *SMALL, "mode=sync", "learner.samples_per_step=32")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["staleness_max"] == 0 and r["dropped_stale"] == 0 for r in rows)


@pytest.mark.slow
def test_embedded_default_learns_within_five_minutes(tmp_path):
    """README: the embedded default's mean reward over its last 10 steps is >= 0.25 and >= 2x its first 10."""
    out = tmp_path / "run"
    started = time.monotonic()
    proc = _train(out, timeout=420)
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    rewards = [r["reward_mean"] for r in _metrics(out)]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last >= 2 * first and last >= 0.25, (first, last)
    assert wall < 300, wall


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes_complete_a_run(tmp_path):
    """Multi-node on one machine: two torchrun agents (--nnodes 2) meet by c10d rendezvous on 127.0.0.1."""
    out = tmp_path / "run"
    port = _free_port()
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=e2e-two-nodes",
             "-m", "async_grpo", "train", str(ROOT / "configs/local.yaml"), f"out_dir={out}", *SMALL],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for _ in range(2)
    ]
    outputs = [a.communicate(timeout=240)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]


def _standins(bin_dir: Path, nodes: list[str]) -> None:
    """`srun` and `scontrol` that run each node's command as a local process (one per node)."""
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        "# stand-in: show hostnames LIST | show node NAME\n"
        f'if [ "$1 $2" = "show hostnames" ]; then printf "%s\\n" {" ".join(nodes)}; exit 0; fi\n'
        'if [ "$1 $2" = "show node" ]; then echo "NodeName=$3 Arch=x86_64"; '
        'echo "   NodeAddr=127.0.0.1 NodeHostName=$3"; exit 0; fi\n'
        'echo "scontrol stand-in: unsupported $*" >&2; exit 1\n'
    )
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "# stand-in: start the command once per node (SLURM_NODEID/SLURM_PROCID set), wait for all\n"
        "n=1\n"
        "while [ $# -gt 0 ]; do case $1 in\n"
        "  --nodes=*) n=${1#--nodes=}; shift;; --nodes|-N) n=$2; shift 2;;\n"
        "  --ntasks=*|--ntasks-per-node=*|--kill-on-bad-exit=*|--kill-on-bad-exit) shift;;\n"
        "  -w|--nodelist) shift 2;; --*) shift;; *) break;; esac; done\n"
        "pids=()\n"
        'for ((i=0; i<n; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" & pids+=($!); done\n'
        "rc=0; for p in \"${pids[@]}\"; do wait $p || rc=$?; done; exit $rc\n"
    )
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)


@pytest.mark.slow
@pytest.mark.parametrize("script,nodes", [("train_1node.sbatch", ["n1"]), ("train_multinode.sbatch", ["n1", "n2"])])
def test_sbatch_scripts_run_under_slurm_standins(tmp_path, script, nodes):
    bin_dir = tmp_path / "bin"
    _standins(bin_dir, nodes)
    out = tmp_path / "run"
    env = _env()
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHON=sys.executable, GPUS_PER_NODE="1" if len(nodes) > 1 else "2",
        SLURM_NNODES=str(len(nodes)), SLURM_JOB_NODELIST=",".join(nodes), SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="e2e", OUT_DIR=str(out), RDZV_PORT=str(_free_port()),
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm" / script), str(ROOT / "configs/local.yaml"), *SMALL],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]
    if len(nodes) > 1:
        assert "rendezvous at 127.0.0.1:" in proc.stdout


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.trainer.max_steps >= 1


def test_local_launch_world_is_learners_plus_worker_groups():
    from async_grpo.launch import local_world_size, plan_layout

    cfg = load_config(ROOT / "configs/local.yaml", ["workers.group_tp_sizes=[1,2]", "learner.num_ranks=2"])
    layout = plan_layout(cfg, local_world_size(cfg))
    assert layout.world_size == 5 and layout.group_sizes == (1, 2)
    assert [layout.worker_group_ranks(g) for g in range(2)] == [[2], [3, 4]]
    assert [layout.worker_group_of(r) for r in range(5)] == [None, None, 0, 1, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_single_gpu_config_runs_a_few_steps(tmp_path):
    out = tmp_path / "run"
    cmd = [*CLI, "train", str(ROOT / "configs/single_gpu.yaml"), f"out_dir={out}", "trainer.max_steps=3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]
