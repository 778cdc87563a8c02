"""The run log a resumed run reopens: steps past the checkpoint and a line cut short by a kill are dropped."""

import json

from async_grpo.learner.run_log import RunLog


def test_resumed_log_keeps_steps_up_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    lines = [json.dumps({"step": s, "reward_mean": s / 10}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "rew')
    log = RunLog(tmp_path, resume_step=3, tensorboard=False)
    log.write({"step": 4, "reward_mean": 0.9})
    log._file.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["reward_mean"] == 0.9
