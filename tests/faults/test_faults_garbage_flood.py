"""A flood of malformed messages to the running learner's trajectory endpoint (read from
out_dir/endpoints.json): the learner rejects and counts each one, keeps none of them in memory, and
the run completes with every step logged once.

With CURVE on, only peers whose public key is allowed get anything delivered: a client without CURVE
and a client with a valid but unlisted key pair deliver nothing (the count does not move), while
garbage from an allowed key still reaches the schema check and is rejected and counted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import zmq.auth

from async_grpo.transport.curve import write_curve_keys
from garbage import flood, malformed_messages
from training_run import SMALL_RUN, TrainingRun, rss_bytes

MAX_MESSAGE_MB = 1.0
ROUNDS = 150  # messages sent: ROUNDS x kinds (7), about 60 MiB of garbage in all
MAX_STEPS = 30


def _flood_batch() -> list[list[bytes]]:
    kinds = malformed_messages(int(MAX_MESSAGE_MB * 2**20))
    return [frames for _ in range(ROUNDS) for frames in kinds.values()]


def _endpoint(out: Path) -> str:
    return json.loads((out / "endpoints.json").read_text())["trajectories"]


def test_garbage_flood_is_rejected_counted_and_not_kept(tmp_path):
    out = tmp_path / "run"
    messages = _flood_batch()
    run = TrainingRun(out, [*SMALL_RUN, f"trainer.max_steps={MAX_STEPS}", f"transport.max_message_mb={MAX_MESSAGE_MB}"])
    try:
        run.wait_until(lambda: len(run.metrics()) >= 2, 150, "two learner steps")
        learner = run.pid_of(0)
        rss_before = rss_bytes(learner)
        assert flood(_endpoint(out), messages, timeout_s=60) == len(messages)
        run.wait_until(lambda: any(r["rejected_messages"] == len(messages) for r in run.metrics()), 60,
                       f"a metrics row counting all {len(messages)} rejected messages")
        growth = rss_bytes(learner) - rss_before
        print(f"learner RSS growth over the flood: {growth / 2**20:.1f} MiB")
        assert run.wait(240) == 0, run.log_text()[-4000:]
    finally:
        run.kill_tree()

    rows = run.metrics()
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    assert rows[-1]["rejected_messages"] == len(messages)
    # Retaining the garbage would take len(messages) x ~37 KiB on average; allow a quarter of it for noise.
    sent_bytes = sum(len(f) for frames in messages for f in frames)
    assert growth < sent_bytes / 4, f"learner RSS grew by {growth / 2**20:.1f} MiB over a {sent_bytes / 2**20:.0f} MiB flood"


def test_with_curve_only_allowed_peers_deliver_and_their_garbage_is_counted(tmp_path):
    keys = write_curve_keys(tmp_path / "keys", ("worker", "tester"))
    tester_public, tester_secret = zmq.auth.load_certificate(str(tmp_path / "keys" / "workers" / "tester.key_secret"))
    rogue_public, rogue_secret = zmq.auth.load_certificate(zmq.auth.create_certificates(tmp_path, "rogue")[1])
    server_public, _ = zmq.auth.load_certificate(keys.server_public_file)
    curve = [f"transport.curve.{k}={v}" for k, v in keys.model_dump().items()]
    out = tmp_path / "run"
    kinds = malformed_messages(int(MAX_MESSAGE_MB * 2**20))
    allowed_garbage = list(kinds.values()) * 3
    # recv_hwm=1 as in configs/local.yaml: the receiver raises it to the 2 that CURVE needs.
    run = TrainingRun(out, [*SMALL_RUN, "trainer.max_steps=20", f"transport.max_message_mb={MAX_MESSAGE_MB}",
                            "transport.recv_hwm=1", *curve])
    try:
        run.wait_until(lambda: (out / "endpoints.json").exists(), 150, "the learner's endpoints")
        endpoint = _endpoint(out)
        assert flood(endpoint, allowed_garbage, timeout_s=30,
                     curve={"public": tester_public, "secret": tester_secret, "server": server_public}) == len(allowed_garbage)
        # Neither can complete the handshake: their messages stay queued on their side, then are dropped.
        flood(endpoint, list(kinds.values()), timeout_s=1.0)
        flood(endpoint, list(kinds.values()), timeout_s=1.0,
              curve={"public": rogue_public, "secret": rogue_secret, "server": server_public})
        run.wait_until(lambda: any(r["rejected_messages"] == len(allowed_garbage) for r in run.metrics()), 60,
                       f"a metrics row counting the {len(allowed_garbage)} rejected messages of the allowed peer")
        time.sleep(1.0)  # anything the others could still deliver would be counted by now
        assert run.wait(240) == 0, run.log_text()[-4000:]
    finally:
        run.kill_tree()

    rows = run.metrics()
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[-1]["rejected_messages"] == len(allowed_garbage)
