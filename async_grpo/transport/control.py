"""The weights-ready control channel: the learner tells each worker group "version v is on its way".

The weight broadcast on a sync group is a collective: the group's ranks must join it. The learner's
per-group sender calls `WeightsAnnouncer.begin(group, v)` just before it broadcasts version v on that
group and `end(group)` when done; the announcer (a PUB socket owned by one thread) publishes the
announcement at once and repeats it every `heartbeat_s` while the broadcast is waiting, so a worker
that connects late or reconnects still hears it. A worker's `WeightsListener.poll()` never blocks: it
drains what arrived and returns the newest announced version it has not returned before (and that is
newer than the version the worker holds), else None. A group has at most one broadcast in flight, so
each returned version means: join exactly one `WeightReceiver.receive()` now.

Message: two frames, topic b"<group name>\\0" (the NUL keeps "sync-1" from matching "sync-10") and
the version as 8 little-endian bytes.
"""

from __future__ import annotations

import threading

import zmq

from async_grpo.config import TransportConfig
from async_grpo.transport.binding import bind_socket, release_context
from async_grpo.transport.curve import make_curve_client, make_curve_server, start_authenticator


def _topic(group: str) -> bytes:
    return group.encode() + b"\0"


class WeightsAnnouncer:
    """Learner side: a PUB socket bound to host:port, published by one background thread."""

    def __init__(self, cfg: TransportConfig, host: str = "127.0.0.1", port: int = 0, heartbeat_s: float = 0.5):
        self.heartbeat_s = heartbeat_s
        self._in_flight: dict[str, int] = {}  # group -> version being broadcast now
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._auth = start_authenticator(self._context, cfg.curve) if cfg.curve.enabled else None
        self._socket = self._context.socket(zmq.PUB)
        self._socket.linger = 0
        if cfg.curve.enabled:
            make_curve_server(self._socket, cfg.curve)
        try:
            self.port = bind_socket(self._socket, host, port, "weights announcer")
        except ValueError:
            self._close_context()
            raise
        self.endpoint = f"tcp://{host}:{self.port}"
        self._thread = threading.Thread(target=self._run, name="weights-announcer", daemon=True)
        self._thread.start()

    def begin(self, group: str, version: int) -> None:
        """Announce that version `version` is being broadcast on `group` (repeated until `end`)."""
        with self._lock:
            self._in_flight[group] = version
        self._wake.set()

    def end(self, group: str) -> None:
        """The broadcast on `group` finished (or failed): stop repeating its announcement."""
        with self._lock:
            self._in_flight.pop(group, None)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.wait(self.heartbeat_s)
                self._wake.clear()
                with self._lock:
                    in_flight = list(self._in_flight.items())
                for group, version in in_flight:
                    self._socket.send_multipart([_topic(group), version.to_bytes(8, "little")])
        finally:
            self._socket.close(linger=0)

    def _close_context(self) -> None:
        release_context(self._context, self._auth)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self._close_context()


class WeightsListener:
    """Worker side: a SUB socket for one sync group's announcements; `poll()` never blocks."""

    def __init__(self, endpoint: str, group: str, cfg: TransportConfig):
        self.group = group
        self._returned = -1
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.linger = 0
        self._socket.rcvhwm = 64
        if cfg.curve.enabled:
            make_curve_client(self._socket, cfg.curve)
        self._socket.setsockopt(zmq.SUBSCRIBE, _topic(group))
        self._socket.connect(endpoint)

    def poll(self, newer_than: int = -1) -> int | None:
        """The newest announced version above `newer_than` and above every version returned before."""
        newest = None
        while True:
            try:
                frames = self._socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            # Anything off-format is ignored: only the learner (CURVE-authenticated if enabled) publishes.
            if len(frames) != 2 or frames[0] != _topic(self.group) or len(frames[1]) != 8:
                continue
            version = int.from_bytes(frames[1], "little")
            if newest is None or version > newest:
                newest = version
        if newest is None or newest <= max(newer_than, self._returned):
            return None
        self._returned = newest
        return newest

    def close(self) -> None:
        if not self._socket.closed:
            self._socket.close(linger=0)
            self._context.term()
