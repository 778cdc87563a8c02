"""A real `async-grpo train` job in a subprocess, as the fault tests drive it.

`TrainingRun` starts the command line exactly as a user would (`python -m async_grpo train
configs/local.yaml ...`, which launches torchrun, which starts the learner and worker processes), in
a session of its own so that the whole process tree can be killed if a test fails. Every wait has a
deadline: a bug makes a test fail with the run's log attached, never hang. Ranks are found by the
pid files job.py writes (`out_dir/pids/rank<r>.pid`).

`SMALL_RUN` shrinks the embedded sorting demo to a few seconds per attempt: 8 prompts x 4 samples,
32 trajectories per learner step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[2]
LOCAL_CONFIG = REPO / "configs" / "local.yaml"
SMALL_RUN = [
    "workers.prompts_per_batch=8",
    "workers.group_size=4",
    "learner.samples_per_step=32",
    "transport.queue_size=64",
    "transport.sync_timeout_s=60",
    "transport.collective_timeout_s=90",
]


def train_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_train_cli(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """`async-grpo train ARGS` to completion (stdout and stderr apart)."""
    return subprocess.run(
        [sys.executable, "-m", "async_grpo", "train", *args],
        capture_output=True, text=True, timeout=timeout_s, env=train_env(), cwd=REPO,
    )


class TrainingRun:
    """One `async-grpo train` process tree; its combined output goes to `out_dir/../<name>.log`."""

    def __init__(self, out_dir: Path, overrides: list[str], extra_args: tuple[str, ...] | list[str] = (),
                 name: str = "train", config: Path = LOCAL_CONFIG):
        self.out_dir = Path(out_dir)
        self.log_path = self.out_dir.parent / f"{name}.log"
        self._log = self.log_path.open("w")
        cmd = [sys.executable, "-m", "async_grpo", "train", str(config), f"out_dir={self.out_dir}",
               *overrides, *extra_args]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=train_env(), cwd=REPO,
                                     start_new_session=True)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _fail(self, why: str) -> None:
        self.kill_tree()
        tail = "\n".join(self.log_text().splitlines()[-60:])
        raise AssertionError(f"{why}\n--- last lines of {self.log_path} ---\n{tail}")

    def wait(self, timeout_s: float) -> int:
        """The launcher's exit code; the test fails (and the tree is killed) past `timeout_s`."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._fail(f"the run did not end within {timeout_s} s")
        raise AssertionError("unreachable")

    def wait_until(self, ready: Callable[[], Any], timeout_s: float, what: str) -> Any:
        """Poll `ready()` until it returns something truthy; fail if the run ends first or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            if self.proc.poll() is not None:
                self._fail(f"the run exited (code {self.proc.returncode}) before {what}")
            time.sleep(0.05)
        self._fail(f"no {what} within {timeout_s} s")

    def pid_of(self, rank: int, timeout_s: float = 60) -> int:
        path = self.out_dir / "pids" / f"rank{rank}.pid"

        def read() -> int | None:
            try:
                return int(path.read_text())
            except (OSError, ValueError):
                return None

        return self.wait_until(read, timeout_s, f"pid file {path}")

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.out_dir)

    def kill_tree(self) -> None:
        """SIGKILL the launcher, its session, and every rank process of this run that is still alive.

        torchrun starts the ranks in sessions of their own, so they are also found by their pid files
        (checked against their command line, so a reused pid is never touched).
        """
        if self.proc.poll() is None or _group_alive(self.proc.pid):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        for pid_file in (self.out_dir / "pids").glob("rank*.pid"):
            try:
                pid = int(pid_file.read_text())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if f"out_dir={self.out_dir}".encode() in cmdline:
                os.kill(pid, signal.SIGKILL)
        self._log.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # a line being written right now
    return rows


def complete_checkpoint(out_dir: Path, step: int) -> Path | None:
    path = Path(out_dir) / "checkpoints" / f"step_{step:08d}"
    return path if (path / "complete.json").is_file() else None


def adam_step_of(checkpoint: Path) -> int:
    """The optimiser's own step counter in a ZeRO-1/2 DeepSpeed checkpoint written by one learner rank."""
    state = torch.load(checkpoint / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       weights_only=False, map_location="cpu")
    steps = {int(s["step"]) for s in state["optimizer_state_dict"]["base_optimizer_state"]["state"].values()}
    assert len(steps) == 1, f"parameter groups disagree on the optimiser step: {steps}"
    return steps.pop()


def learner_state_of(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / "learner_rank0.pt", weights_only=False)


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie whose parent has not reaped it yet counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return status.rsplit(")", 1)[1].split()[0] == "Z"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")
