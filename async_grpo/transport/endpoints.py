"""Where the learner listens, and how workers find out without any address configured by hand.

The learner binds its trajectory PULL socket and its weights-ready PUB socket on one host (config
`transport.bind_host`; else this host's address towards torchrun's rendezvous host MASTER_ADDR; else
127.0.0.1), then publishes both addresses as JSON under `ENDPOINTS_KEY` in the torch.distributed store
that torchrun already runs, and writes the same JSON to `out_dir/endpoints.json` for people and tools.
Workers read the key with a timeout and get a clear error when the learner never published.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from async_grpo.config import TransportConfig
from async_grpo.transport.control import WeightsAnnouncer
from async_grpo.transport.stream import TrajectoryReceiver

ENDPOINTS_KEY = "async_grpo/endpoints"
ENDPOINTS_FILE = "endpoints.json"
_ANY_ADDRESS = ("0.0.0.0", "*", "")


class EndpointsTimeout(TimeoutError):
    """The learner's endpoints did not appear in the store in time."""


@dataclass(frozen=True)
class LearnerEndpoints:
    """Addresses workers connect to: trajectories (PULL) and weights-ready announcements (PUB)."""

    trajectories: str
    control: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> "LearnerEndpoints":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"learner endpoints from {source} are not JSON ({err}): {text!r:.200}") from None
        if not isinstance(data, dict) or set(data) != {"trajectories", "control"}:
            raise ValueError(f"learner endpoints from {source} = {data!r:.200}: expected keys trajectories, control")
        for key, value in data.items():
            if not isinstance(value, str) or not value.startswith("tcp://"):
                raise ValueError(f"learner endpoint '{key}' from {source} = {value!r}: expected 'tcp://host:port'")
        return cls(**data)


def _is_local_address(ip: str) -> bool:
    """True when `ip` belongs to an interface of this host (binding to it succeeds only then)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return False
    return True


def _address_towards(ip: str) -> str:
    """This host's address on the route to `ip` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((ip, 9))
        except OSError as err:
            raise ValueError(
                f"MASTER_ADDR resolves to {ip}, which this host has no route to ({err}): set transport.bind_host"
            ) from None
        return probe.getsockname()[0]


def resolve_bind_host(bind_host: str | None = None, master_addr: str | None = None) -> str:
    """The address to bind (and advertise): bind_host, else towards MASTER_ADDR, else 127.0.0.1.

    `master_addr` defaults to the MASTER_ADDR environment variable torchrun sets.
    """
    if bind_host:
        return bind_host
    master = master_addr if master_addr is not None else os.environ.get("MASTER_ADDR")
    if not master:
        return "127.0.0.1"
    try:
        ip = socket.getaddrinfo(master, None, socket.AF_INET)[0][4][0]
    except socket.gaierror as err:
        raise ValueError(
            f"MASTER_ADDR = {master!r} does not resolve ({err}): expected a host name or IPv4 address "
            f"(or set transport.bind_host)"
        ) from None
    return ip if _is_local_address(ip) else _address_towards(ip)


def advertised_host(bind_host: str, master_addr: str | None = None) -> str:
    """The address workers connect to: the bound one, or a routable one when bound to all interfaces."""
    return resolve_bind_host(None, master_addr) if bind_host in _ANY_ADDRESS else bind_host


def publish_endpoints(
    store: dist.Store | None, endpoints: LearnerEndpoints, out_dir: str | Path | None = None
) -> None:
    """Learner rank 0: make the endpoints visible to every worker (store) and to people (file)."""
    if store is not None:
        store.set(ENDPOINTS_KEY, endpoints.to_json())
    if out_dir is not None:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / ENDPOINTS_FILE).write_text(endpoints.to_json() + "\n")


def read_endpoints(store: dist.Store, timeout_s: float) -> LearnerEndpoints:
    """Worker: wait up to `timeout_s` for the learner's endpoints in the store."""
    try:
        store.wait([ENDPOINTS_KEY], timedelta(seconds=timeout_s))
    except (RuntimeError, dist.DistStoreError) as err:
        raise EndpointsTimeout(
            f"the learner's endpoints (store key {ENDPOINTS_KEY!r}) did not appear within {timeout_s} s: "
            f"is learner rank 0 running and did it bind its sockets? ({err})"
        ) from None
    return LearnerEndpoints.from_json(store.get(ENDPOINTS_KEY), source=f"store key {ENDPOINTS_KEY!r}")


@dataclass
class LearnerSockets:
    """The learner's two listening sockets and their published addresses."""

    receiver: TrajectoryReceiver
    announcer: WeightsAnnouncer
    endpoints: LearnerEndpoints

    def close(self) -> None:
        self.announcer.close()
        self.receiver.close()


def open_learner_sockets(
    cfg: TransportConfig, store: dist.Store | None = None, out_dir: str | Path | None = None
) -> LearnerSockets:
    """Learner rank 0: bind the receiver and announcer, then publish where they are."""
    host = resolve_bind_host(cfg.bind_host)
    receiver = TrajectoryReceiver(cfg, host=host, port=cfg.port)
    try:
        announcer = WeightsAnnouncer(cfg, host=host, port=0)
    except BaseException:
        receiver.close()
        raise
    public = advertised_host(host)
    endpoints = LearnerEndpoints(
        trajectories=f"tcp://{public}:{receiver.port}", control=f"tcp://{public}:{announcer.port}"
    )
    publish_endpoints(store, endpoints, out_dir)
    return LearnerSockets(receiver=receiver, announcer=announcer, endpoints=endpoints)
