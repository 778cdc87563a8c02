"""A peer that stops answering makes the others fail, naming the group, within their timeouts.

Jobs of two ranks (learner 0, worker 1) under torchrun, one rank replaced by `silent_rank.py`, with
tiny timeouts. A worker that never joins the weight broadcast: the learner's broadcast on 'sync-0'
times out after `transport.sync_timeout_s`, the group is marked dead and, with no live group left,
the learner fails naming it. A learner that never sends weights: the worker gives up after
`transport.collective_timeout_s`, naming its sync group. Either way the job exits non-zero, in a
bounded time, instead of hanging.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from training_run import LOCAL_CONFIG, REPO, SMALL_RUN, train_env

SILENT_RANK = Path(__file__).with_name("silent_rank.py")
BOUND_S = 60  # start-up (about 10 s on 2 busy cores) + timeouts + torchrun's teardown, with room


def run_with_silent_rank(tmp_path: Path, silent: int, overrides: list[str]) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(SILENT_RANK),
           str(silent), str(LOCAL_CONFIG), f"out_dir={tmp_path / 'run'}", *SMALL_RUN, *overrides]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BOUND_S + 60, env=train_env(), cwd=REPO)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def test_learner_fails_naming_the_sync_group_a_worker_never_joins(tmp_path):
    code, output, elapsed = run_with_silent_rank(
        tmp_path, silent=1, overrides=["transport.sync_timeout_s=3", "transport.collective_timeout_s=30"]
    )
    assert code != 0
    assert elapsed < BOUND_S
    assert "weight sync to group 'sync-0' (ranks [0, 1]) for version 0: a peer did not join within 3.0 s" in output
    assert "WorkersLost: every weight-sync group is dead, no worker can receive new weights: group 'sync-0'" in output
    # The learner gave up on the dead group, not after the 30 s collective timeout of its queue wait.
    assert "no trajectory reached the learner" not in output


def test_worker_fails_naming_its_sync_group_when_the_learner_sends_nothing(tmp_path):
    code, output, elapsed = run_with_silent_rank(
        tmp_path, silent=0, overrides=["transport.sync_timeout_s=3", "transport.collective_timeout_s=4"]
    )
    assert code != 0
    assert elapsed < BOUND_S
    assert (
        "LearnerSilent: worker group 0: waited 4 s (transport.collective_timeout_s) with neither new weights "
        "on sync group 'sync-0' (holding version -1)" in output
    )
