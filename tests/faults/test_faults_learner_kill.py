"""SIGKILL of the learner mid-run, then `--resume`: the run continues after its newest complete checkpoint.

The first run is killed (learner rank 0, found by its pid file) after it has logged steps past its
newest checkpoint; torchrun then stops the worker and fails. Before resuming, a leftover temporary
checkpoint directory of a later step (as a crash mid-save leaves it, here even with a marker file
in it) is planted: it must never be loaded. The resumed run must continue at the step after the
checkpoint with the checkpoint's optimiser state (Adam's own step counter ends at max_steps, not
max_steps - checkpoint step), data position (the worker starts at the saved prompt position) and
policy version, and log every step exactly once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

from training_run import (
    SMALL_RUN,
    TrainingRun,
    adam_step_of,
    complete_checkpoint,
    learner_state_of,
    process_gone,
)

MAX_STEPS = 12
OVERRIDES = [*SMALL_RUN, f"trainer.max_steps={MAX_STEPS}", "trainer.save_every=3", "trainer.keep_checkpoints=100"]


def test_resume_after_learner_sigkill_continues_at_the_next_step_with_saved_state(tmp_path):
    out = tmp_path / "run"
    first = TrainingRun(out, OVERRIDES, name="first")
    try:
        first.wait_until(lambda: complete_checkpoint(out, 6), 150, "checkpoint at step 6")
        first.wait_until(lambda: len(first.metrics()) >= 7, 60, "metrics row of step 7")
        learner = first.pid_of(0)
        os.kill(learner, signal.SIGKILL)
        first.wait_until(lambda: process_gone(learner), 10, "exit of the killed learner")
        assert first.wait(60) != 0
    finally:
        first.kill_tree()

    logged_before = [r["step"] for r in first.metrics()]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "complete.json").is_file())
    newest = int(ckpts[-1].removeprefix("step_"))
    assert newest in (6, 9) and newest < MAX_STEPS
    assert logged_before[:7] == list(range(1, 8))
    saved = learner_state_of(out / "checkpoints" / ckpts[-1])
    assert saved["step"] == saved["policy_version"] == newest
    assert adam_step_of(out / "checkpoints" / ckpts[-1]) == newest

    # A crash mid-save leaves a temporary directory: it must be ignored, even with a marker inside.
    planted = out / "checkpoints" / f".tmp-step_{MAX_STEPS - 1:08d}"
    shutil.copytree(out / "checkpoints" / ckpts[-1], planted)
    (planted / "learner_rank0.pt").write_bytes(b"half-written")
    (planted / "complete.json").write_text(json.dumps({"step": MAX_STEPS - 1, "world_size": 1}) + "\n")

    second = TrainingRun(out, OVERRIDES, ["--resume"], name="second")
    try:
        assert second.wait(240) == 0, second.log_text()[-4000:]
    finally:
        second.kill_tree()

    text = second.log_text()
    assert re.findall(r"resumed from \S+/(step_\d{8}) at step (\d+) \(policy version (\d+)\)", text) == [
        (ckpts[-1], str(newest), str(newest))
    ]
    starts = re.findall(r"worker group 0 rank 0 starts at prompt position (\d+)", text)
    assert starts == [str(saved["data_position"]["worker_positions"]["0"])] and int(starts[0]) > 0
    rows = second.metrics()
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    assert [r["policy_version"] for r in rows] == list(range(1, MAX_STEPS + 1))
    final = complete_checkpoint(out, MAX_STEPS)
    assert final is not None and adam_step_of(final) == MAX_STEPS
    assert learner_state_of(final)["policy_version"] == MAX_STEPS
    assert not planted.exists()  # the next save removed what the crash left
