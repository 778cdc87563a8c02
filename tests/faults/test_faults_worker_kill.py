"""SIGKILL of a rollout worker mid-run: torchrun restarts the job, which resumes from its checkpoint.

The run is started with `--max-restarts 1`; once the learner has written a checkpoint, the worker
process (rank 1, found by its pid file) is killed. torchrun stops the learner and starts the job again
with TORCHELASTIC_RESTART_COUNT=1, which `async-grpo train` treats as `--resume`: the run ends with
exit code 0 and metrics.jsonl holds every step exactly once.
"""

from __future__ import annotations

import os
import re
import signal

from training_run import SMALL_RUN, TrainingRun, complete_checkpoint, learner_state_of, process_gone

MAX_STEPS = 14


def test_run_completes_after_a_rollout_worker_is_killed(tmp_path):
    out = tmp_path / "run"
    run = TrainingRun(out, [*SMALL_RUN, f"trainer.max_steps={MAX_STEPS}", "trainer.save_every=2",
                            "trainer.keep_checkpoints=100"],
                      ["--max-restarts", "1"])
    try:
        run.wait_until(lambda: complete_checkpoint(out, 4), 150, "checkpoint at step 4")
        worker = run.pid_of(1)
        os.kill(worker, signal.SIGKILL)
        run.wait_until(lambda: process_gone(worker), 10, "exit of the killed worker")
        assert run.wait(240) == 0, run.log_text()[-4000:]
    finally:
        run.kill_tree()

    text = run.log_text()
    rows = run.metrics()
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    resumed = re.findall(r"resumed from \S+step_(\d{8}) at step (\d+) \(policy version (\d+)\)", text)
    assert len(resumed) == 1, text[-4000:]
    ckpt_step, at_step, version = (int(x) for x in resumed[0])
    assert ckpt_step == at_step == version and 4 <= at_step < MAX_STEPS
    # The restarted worker starts after the prompts the checkpoint says were consumed.
    starts = [int(p) for p in re.findall(r"worker group 0 rank 0 starts at prompt position (\d+)", text)]
    assert len(starts) == 2 and starts[0] == 0
    saved = learner_state_of(out / "checkpoints" / f"step_{ckpt_step:08d}")["data_position"]["worker_positions"]
    assert starts[1] == saved["0"] > 0
    # sync_every=1: the row of step s was trained by policy version s, before and after the restart.
    assert [r["policy_version"] for r in rows] == list(range(1, MAX_STEPS + 1))
