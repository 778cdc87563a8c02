"""Bad config: `async-grpo train` exits with code 2 and one message naming the key, the value and what
was expected, before any process or process group starts, and prints no traceback.

The local launcher's world is `learner.num_ranks + num_workers * workers.tp_size`, which always
leaves whole worker groups; a world that cannot hold the configured roles only happens under
torchrun. Those cases run the command as rank 0 of a torchrun job would (RANK, WORLD_SIZE, MASTER_*
set) with MASTER_PORT pointing nowhere: reaching any rendezvous would fail differently (or hang
until the subprocess timeout), so exit code 2 with the message shows the check came first.
"""

from __future__ import annotations

import socket

import pytest

from async_grpo.transport.curve import write_curve_keys
from training_run import LOCAL_CONFIG, run_train_cli


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free again once closed: nothing listens there


CASES = {
    "unknown_key": (
        ["trainer.max_stepz=5"], None,
        "config key 'trainer.max_stepz' = 5 (from {config} + command line): expected no such key "
        "(unknown keys are not allowed)",
    ),
    "wrong_type": (
        ["trainer.max_steps=abc"], None,
        "config key 'trainer.max_steps' = 'abc' (from {config} + command line): expected a valid "
        "integer, unable to parse string as an integer",
    ),
    "neither_bool_nor_auto": (
        ["learner.compile=maybe"], None,
        "config key 'learner.compile' = 'maybe' (from {config} + command line): expected a valid boolean, "
        "unable to interpret input or 'auto'",
    ),
    "learner_ranks_fill_the_world": (
        ["learner.num_ranks=2"], 2,
        "config key 'learner.num_ranks' = 2: expected fewer than the world size (2 processes), so that at least "
        "one worker group remains",
    ),
    "tp_size_does_not_divide_worker_ranks": (
        ["workers.tp_size=2"], 4,
        "config key 'workers.tp_size' = 2: expected a divisor of the 3 worker ranks (world 4 - 1 learner ranks)",
    ),
    "tp_size_does_not_divide_heads": (
        ["workers.tp_size=3"], None,
        "config key 'workers.tp_size' = 3: expected sizes dividing the model's 4 attention heads and 2 KV heads",
    ),
    "kv_budget_below_one_group": (
        ["kv.num_blocks=2"], None,
        "config key 'kv.num_blocks' = 2: expected room for at least one group: 16 blocks of 16 tokens for a "
        "12-token prompt x 8 samples x 8 new tokens, but the pool has 2",
    ),
    "missing_model_directory": (
        ["model.path={tmp}/no_such_model"], None,
        "config key 'model.path' = '{tmp}/no_such_model': expected an existing Hugging Face checkpoint directory",
    ),
    "missing_model_directory_under_torchrun": (
        ["model.path={tmp}/no_such_model"], 2,
        "config key 'model.path' = '{tmp}/no_such_model': expected an existing Hugging Face checkpoint directory",
    ),
    "curve_key_file_missing": (
        ["transport.curve.enabled=true", "transport.curve.server_secret_file={tmp}/learner.key_secret",
         "transport.curve.server_public_file={tmp}/learner.key", "transport.curve.client_secret_file={tmp}/w.key_secret",
         "transport.curve.allowed_clients_dir={tmp}"], None,
        "config key 'transport.curve.server_secret_file' = '{tmp}/learner.key_secret': expected an existing "
        "zmq.auth certificate file",
    ),
    "negative_restart_count": (
        ["--max-restarts", "-1"], None,
        "config key '--max-restarts' = -1 (from command line): expected a count >= 0",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_exits_2_naming_key_value_and_expectation_before_start(case, tmp_path, monkeypatch):
    args, torchrun_world, message = CASES[case]
    args = [a.format(tmp=tmp_path) for a in args]
    out_dir = tmp_path / "run"
    if torchrun_world is not None:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(torchrun_world),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_closed_port())}.items():
            monkeypatch.setenv(key, value)
    proc = run_train_cli([str(LOCAL_CONFIG), f"out_dir={out_dir}", *args], timeout_s=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"async-grpo train: error: {message.format(config=LOCAL_CONFIG, tmp=tmp_path)}\n"
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out_dir.exists()  # no process of the run started (the learner creates it, each rank a pid file)
