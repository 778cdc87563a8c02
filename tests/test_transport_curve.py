"""CURVE: only workers whose public key is in the allowed-clients directory can deliver anything."""

from __future__ import annotations

import time

import pytest
import torch
import zmq.auth

from async_grpo.config import CurveConfig, TransportConfig
from async_grpo.transport.control import WeightsAnnouncer, WeightsListener
from async_grpo.transport.curve import write_curve_keys
from async_grpo.transport.stream import PushTimeout, TrajectoryReceiver, TrajectoryStream
from async_grpo.transport.trajectory import Trajectory


def make_traj(reward: float) -> Trajectory:
    return Trajectory([1, 2], [3, 4, 5], [-0.1, -0.2, -0.3], reward, 0.0, 0, 0, 0, "stop", 0)


@pytest.fixture()
def curve_configs(tmp_path):
    allowed = write_curve_keys(tmp_path / "keys", ("worker",))
    _, rogue_secret = zmq.auth.create_certificates(tmp_path, "rogue")  # a valid pair, never allowed
    rogue = allowed.model_copy(update={"client_secret_file": str(rogue_secret)})
    return TransportConfig(curve=allowed), TransportConfig(curve=rogue)


def test_client_without_an_allowed_key_delivers_nothing_and_an_allowed_one_delivers(curve_configs):
    allowed_cfg, rogue_cfg = curve_configs
    with TrajectoryReceiver(allowed_cfg) as receiver:
        with TrajectoryStream(receiver.endpoint, rogue_cfg, linger_ms=0) as rogue:
            with pytest.raises(PushTimeout):
                rogue.push(make_traj(-1.0), timeout=1.0)
        with TrajectoryStream(receiver.endpoint, TransportConfig(), linger_ms=0) as plain:
            with pytest.raises(PushTimeout):
                plain.push(make_traj(-2.0), timeout=0.5)
        assert receiver.get(timeout=0.2) is None
        with TrajectoryStream(receiver.endpoint, allowed_cfg) as worker:
            assert worker.push(make_traj(1.0), timeout=10)
            got = receiver.get(timeout=10)
        assert got is not None and got.reward == 1.0 and torch.equal(got.completion_ids, torch.tensor([3, 4, 5], dtype=torch.int32))
        counters = receiver.counters()
        assert (counters.received, counters.accepted, counters.delivered) == (1, 1, 1)


def test_weights_announcements_reach_only_allowed_listeners(curve_configs):
    allowed_cfg, rogue_cfg = curve_configs
    announcer = WeightsAnnouncer(allowed_cfg, heartbeat_s=0.05)
    good = WeightsListener(announcer.endpoint, "sync-0", allowed_cfg)
    rogue = WeightsListener(announcer.endpoint, "sync-0", rogue_cfg)
    try:
        announcer.begin("sync-0", 4)
        deadline = time.monotonic() + 10
        version = None
        while version is None and time.monotonic() < deadline:
            version = good.poll()
            time.sleep(0.02)
        assert version == 4
        time.sleep(0.3)  # several heartbeats
        assert rogue.poll() is None
    finally:
        good.close()
        rogue.close()
        announcer.close()


def test_enabled_curve_config_requires_every_key_file():
    with pytest.raises(ValueError, match="transport.curve.server_secret_file must be set"):
        CurveConfig(enabled=True)


def test_missing_key_file_is_named_in_the_error(tmp_path, curve_configs):
    allowed_cfg, _ = curve_configs
    broken = allowed_cfg.model_copy(
        update={"curve": allowed_cfg.curve.model_copy(update={"client_secret_file": str(tmp_path / "nope.key_secret")})}
    )
    with pytest.raises(ValueError, match="transport.curve.client_secret_file = .*nope.key_secret"):
        TrajectoryStream("tcp://127.0.0.1:1", broken)
