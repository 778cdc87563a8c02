"""Endpoint rendezvous through a real TCPStore, bind-host choice, and the non-blocking weights-ready poll."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from async_grpo.config import TransportConfig
from async_grpo.transport.control import WeightsAnnouncer, WeightsListener
from async_grpo.transport.endpoints import (
    ENDPOINTS_KEY,
    EndpointsTimeout,
    LearnerEndpoints,
    open_learner_sockets,
    read_endpoints,
    resolve_bind_host,
)
from async_grpo.transport.stream import TrajectoryStream
from async_grpo.transport.trajectory import Trajectory

READER = """
import sys
from datetime import timedelta
import torch.distributed as dist
from async_grpo.transport.endpoints import read_endpoints
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False, timeout=timedelta(seconds=20))
print(read_endpoints(store, timeout_s=20).to_json())
"""


def test_endpoints_published_in_a_tcp_store_are_read_by_another_process(tmp_path):
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    # The reader starts first and waits: workers usually come up before the learner has bound its sockets.
    reader = subprocess.Popen([sys.executable, "-c", READER, str(store.port)], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    sockets = open_learner_sockets(TransportConfig(bind_host="127.0.0.1"), store, out_dir=tmp_path / "run")
    try:
        out, _ = reader.communicate(timeout=60)
        assert reader.returncode == 0
        assert LearnerEndpoints.from_json(out, "reader") == sockets.endpoints
        on_disk = json.loads((tmp_path / "run" / "endpoints.json").read_text())
        assert on_disk == {"trajectories": sockets.endpoints.trajectories, "control": sockets.endpoints.control}
        assert sockets.endpoints.trajectories == f"tcp://127.0.0.1:{sockets.receiver.port}"
        with TrajectoryStream(sockets.endpoints.trajectories, TransportConfig()) as stream:
            stream.push(Trajectory([1], [2], [-0.5], 1.0, 0.0, 0, 0, 0, "stop", 0), timeout=10)
            assert sockets.receiver.get(timeout=10).completion_ids.tolist() == [2]
    finally:
        reader.kill()
        sockets.close()


def test_reading_endpoints_times_out_with_an_error_naming_the_key():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    started = time.monotonic()
    with pytest.raises(EndpointsTimeout, match=f"store key '{ENDPOINTS_KEY}'.* within 0.3 s"):
        read_endpoints(store, timeout_s=0.3)
    assert time.monotonic() - started < 5


def test_malformed_endpoints_json_is_rejected_with_the_bad_value():
    with pytest.raises(ValueError, match="learner endpoint 'control' from test = 'ipc://x'"):
        LearnerEndpoints.from_json('{"trajectories": "tcp://a:1", "control": "ipc://x"}', "test")


def test_bind_host_prefers_config_then_master_addr_then_loopback(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert resolve_bind_host("10.1.2.3") == "10.1.2.3"
    assert resolve_bind_host(None) == "127.0.0.1"
    assert resolve_bind_host(None, master_addr="localhost") == "127.0.0.1"
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert resolve_bind_host(None) == "127.0.0.1"
    with pytest.raises(ValueError, match="MASTER_ADDR = 'no-such-host.invalid' does not resolve"):
        resolve_bind_host(None, master_addr="no-such-host.invalid")


def test_bind_host_for_a_remote_master_is_this_hosts_address_on_the_route_to_it():
    remote = "192.0.2.1"  # TEST-NET-1: never a local interface
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((remote, 9))
            expected = probe.getsockname()[0]
    except OSError:
        pytest.skip("this host has no route off the machine")
    assert resolve_bind_host(None, master_addr=remote) == expected != remote


def test_listener_poll_never_blocks_and_returns_each_version_once():
    announcer = WeightsAnnouncer(TransportConfig(), heartbeat_s=0.05)
    listener = WeightsListener(announcer.endpoint, "sync-1", TransportConfig())
    other = WeightsListener(announcer.endpoint, "sync-10", TransportConfig())
    try:
        started = time.monotonic()
        assert listener.poll() is None
        assert time.monotonic() - started < 0.05
        time.sleep(0.3)  # let the subscriptions reach the publisher
        announcer.begin("sync-1", 7)
        seen = []
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            version = listener.poll()
            if version is not None:
                seen.append(version)
            time.sleep(0.01)
        time.sleep(0.3)  # the heartbeat repeats "7" meanwhile
        assert seen == [7]
        assert listener.poll() is None
        assert other.poll() is None  # "sync-1" must not match the "sync-10" subscription
        announcer.end("sync-1")
        announcer.begin("sync-1", 9)
        time.sleep(0.3)
        assert listener.poll(newer_than=9) is None  # the worker already holds 9
        announcer.begin("sync-1", 11)
        time.sleep(0.3)
        assert listener.poll() == 11
    finally:
        listener.close()
        other.close()
        announcer.close()
