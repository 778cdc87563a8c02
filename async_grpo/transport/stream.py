"""The trajectory stream: rollout workers PUSH encoded trajectories, the learner PULLs them.

`TrajectoryStream` (one per worker) sends each `push` as one multipart message (a list of trajectories,
or a columnar `TrajectoryBatch`: a worker's whole generation batch, sent without a copy). ZeroMQ's send high-water mark gives back-pressure: when the learner falls behind, the
worker's queue fills and `push` either waits (`on_full="block"`, in short polls so a timeout or a
closed learner is noticed) or drops the message and counts it (`on_full="drop"`). The socket uses
`immediate`, so nothing queues for a learner that is not connected, and ZeroMQ reconnects by itself.

`TrajectoryReceiver` (the learner) binds a PULL socket; one background thread receives, validates
(codec.decode) and puts each message on a bounded queue as one columnar `TrajectoryBatch`: nothing
per trajectory is built in that thread. The thread waits inside a blocking receive with a short
timeout (not a poll call per message), and the decoded tensors are views of the received frames, so
a message costs one receive and one decode; messages that were already waiting behind it are read
without blocking and share one queue hand-off and one counters update. The learner takes columns
(`take_batches`) or lazy per-trajectory views (`get_batch`, `get`). A malformed message is counted as
rejected and dropped, never raised (a message of another schema version is also counted apart). When
the queue (bounded in trajectories) is full the thread either stops reading ("block": the socket's
buffers fill and the workers feel the back-pressure) or drops and counts. Memory on both sides is
bounded by the high-water marks, the queue size and `max_message_mb`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from operator import attrgetter
from typing import Literal, Sequence

import torch
import zmq

from async_grpo.config import TransportConfig
from async_grpo.transport.binding import bind_socket, release_context
from async_grpo.transport.codec import MalformedMessage, UnsupportedSchema, decode, encode, encoded_nbytes
from async_grpo.transport.curve import make_curve_client, make_curve_server, start_authenticator
from async_grpo.transport.trajectory import Trajectory
from async_grpo.transport.trajectory_batch import TrajectoryBatch, TrajectoryView
from async_grpo.transport.trajectory_queue import BoundedBatchQueue

log = logging.getLogger(__name__)

_POLL_MS = 100  # how often blocked loops look at their deadline and stop flag
_HEADER_ALLOWANCE = 0.9  # share of max_message_mb given to tensor bytes when splitting a push
# Most messages, and trajectories, the receiving thread reads without waiting before it queues them:
# enough to pay the queue's lock once for many small messages, few enough to hand big ones over soon.
_BURST_MESSAGES = 64
_BURST_ROWS = 256
_COPY_BELOW = zmq.COPY_THRESHOLD  # bytes under which a frame is copied rather than sent zero-copy
_prompt_of = attrgetter("prompt_ids")
_completion_of = attrgetter("completion_ids")
_numel = torch.Tensor.numel
# Plain ints: combining zmq's flag enums costs about a microsecond per send.
_SEND_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_SEND_LAST = int(zmq.NOBLOCK)


class PushTimeout(TimeoutError):
    """`push` waited `timeout` seconds for room in the send queue (on_full="block")."""


@dataclass
class StreamCounters:
    """Worker-side totals: trajectories sent or dropped, messages, payload bytes, seconds blocked."""

    sent: int = 0
    dropped: int = 0
    messages: int = 0
    bytes: int = 0
    blocked_s: float = 0.0


@dataclass
class ReceiverCounters:
    """Learner-side totals.

    received, rejected: messages (a message may hold several trajectories); rejected_schema: the rejected
    messages of an unsupported schema version (an older or newer worker), counted in `rejected` too;
    accepted, dropped_full, delivered: trajectories (decoded; shed on a full queue; handed to the learner).
    """

    received: int = 0
    rejected: int = 0
    rejected_schema: int = 0
    accepted: int = 0
    dropped_full: int = 0
    delivered: int = 0


class TrajectoryStream:
    """Worker side: a PUSH socket connected to the learner's trajectory endpoint."""

    def __init__(self, endpoint: str, cfg: TransportConfig, linger_ms: int = 1000):
        if not endpoint.startswith("tcp://"):
            raise ValueError(f"trajectory endpoint {endpoint!r}: expected 'tcp://host:port'")
        self.endpoint = endpoint
        self.on_full: Literal["block", "drop"] = cfg.on_full
        self.counters = StreamCounters()
        self._max_payload = int(cfg.max_message_mb * 2**20 * _HEADER_ALLOWANCE)
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.sndhwm = cfg.send_hwm
        # A bounded linger: queued trajectories get a moment to flush at close, but close never hangs.
        self._socket.linger = linger_ms
        self._socket.immediate = True
        if cfg.curve.enabled:
            make_curve_client(self._socket, cfg.curve)
        self._socket.connect(endpoint)

    def push(self, items: TrajectoryBatch | Trajectory | Sequence[Trajectory], timeout: float | None = None) -> bool:
        """Send trajectories; True when sent, False when dropped (on_full="drop").

        With on_full="block", waits for room up to `timeout` seconds (None: as long as it takes)
        and raises PushTimeout after that. A list or batch is sent as few messages as `max_message_mb`
        allows; a packed TrajectoryBatch within the limit goes without a copy.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if isinstance(items, TrajectoryBatch):
            chunks = self._batch_chunks(items)
        else:
            chunks = self._chunks([items] if isinstance(items, Trajectory) else list(items))
        sent_all = True
        for chunk in chunks:
            sent_all &= self._send(chunk, deadline, timeout)
        return sent_all

    def fits_one_message(self, batch: TrajectoryBatch) -> bool:
        """Whether `push(batch)` sends one message (so a failed push sent nothing of it)."""
        if batch.packed:  # its two frames: prompts and completions, then a logprob per completion token
            tokens, logprobs = batch.frame_arrays()
            return 4 * (tokens.size + logprobs.size) <= self._max_payload
        return 4 * (batch.prompt_ids.numel() + 2 * batch.completion_ids.numel()) <= self._max_payload

    def _batch_chunks(self, batch: TrajectoryBatch) -> list:
        if not len(batch):
            return []
        if batch.packed and self.fits_one_message(batch):
            return [batch]
        return self._chunks(batch.views())

    def _chunks(self, trajs: list) -> list[list]:
        # The usual push (a group well under the limit) is one message: sized with C-level sums first.
        total = 4 * (sum(map(_numel, map(_prompt_of, trajs))) + 2 * sum(map(_numel, map(_completion_of, trajs))))
        if total <= self._max_payload:
            return [trajs]
        chunks: list[list[Trajectory]] = []
        size = 0
        for traj in trajs:
            nbytes = encoded_nbytes(traj)
            if nbytes > self._max_payload:
                raise ValueError(
                    f"trajectory of {traj.num_tokens} tokens needs {nbytes} bytes: expected at most "
                    f"{self._max_payload} (raise transport.max_message_mb)"
                )
            if not chunks or size + nbytes > self._max_payload:
                chunks.append([])
                size = 0
            chunks[-1].append(traj)
            size += nbytes
        return chunks

    def _send(self, chunk: TrajectoryBatch | list, deadline: float | None, timeout: float | None) -> bool:
        frames = encode(chunk)
        try:
            self._send_frames(frames)
        except zmq.Again:  # the send queue is full: waiting (and its clock) starts only here
            if not self._send_when_room(frames, len(chunk), deadline, timeout):
                return False
        header, tokens, logprobs = frames
        counters = self.counters
        counters.sent += len(chunk)
        counters.messages += 1
        counters.bytes += len(header) + tokens.nbytes + logprobs.nbytes
        return True

    def _send_when_room(self, frames: list, count: int, deadline: float | None, timeout: float | None) -> bool:
        """Drop the message (False, counted) with on_full="drop"; else wait for room in short polls (counted
        as blocked), raising PushTimeout past the deadline, and send it."""
        if self.on_full == "drop":
            self.counters.dropped += count
            return False
        started = time.monotonic()
        try:
            while True:
                wait_ms = _POLL_MS
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise PushTimeout(
                            f"push to {self.endpoint} found no room for {timeout} s "
                            f"(send_hwm full or learner not connected)"
                        ) from None
                    wait_ms = max(1, min(_POLL_MS, int(left * 1000)))
                self._socket.poll(wait_ms, zmq.POLLOUT)
                try:
                    self._send_frames(frames)
                    return True
                except zmq.Again:
                    continue
        finally:
            self.counters.blocked_s += time.monotonic() - started

    def _send_frames(self, frames: list) -> None:
        """One multipart message (codec.encode's header bytes and two arrays), without waiting (zmq.Again
        when the send queue is full).

        Large frames go without a copy; small ones are copied into ZeroMQ's message directly, which is
        what pyzmq would do with them anyway, minus the Frame object it builds first. ZeroMQ checks the
        high-water mark on the first part only, and rolls back the parts sent when a later one fails.
        """
        send = self._socket.send
        header, tokens, logprobs = frames
        send(header, _SEND_MORE, copy=len(header) < _COPY_BELOW)
        send(tokens, _SEND_MORE, copy=tokens.nbytes < _COPY_BELOW)
        send(logprobs, _SEND_LAST, copy=logprobs.nbytes < _COPY_BELOW)

    def close(self) -> None:
        """Close the socket (waiting at most the linger time for queued messages)."""
        if not self._socket.closed:
            self._socket.close()
            self._context.term()

    def __enter__(self) -> "TrajectoryStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrajectoryReceiver:
    """Learner side: a PULL socket bound to host:port and a thread that fills a bounded queue."""

    def __init__(self, cfg: TransportConfig, host: str = "127.0.0.1", port: int | None = None):
        self.on_full: Literal["block", "drop"] = cfg.on_full
        self.max_message_bytes = int(cfg.max_message_mb * 2**20)
        self.last_rejection: str | None = None
        self._counters = ReceiverCounters()
        self._lock = threading.Lock()
        self._queue: BoundedBatchQueue[TrajectoryBatch] = BoundedBatchQueue(cfg.queue_size)  # in trajectories
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._context = zmq.Context()
        self._auth = start_authenticator(self._context, cfg.curve) if cfg.curve.enabled else None
        self._socket = self._context.socket(zmq.PULL)
        # libzmq 4.3 signals a CURVE (ZAP-authenticated) PULL socket with a receive high-water mark of 1 as
        # readable but never hands it a message; 2 is the smallest mark that delivers.
        self._socket.rcvhwm = max(cfg.recv_hwm, 2) if cfg.curve.enabled else cfg.recv_hwm
        self._socket.linger = 0
        # Refuse any single frame above the message limit inside ZeroMQ, before it is buffered.
        self._socket.maxmsgsize = self.max_message_bytes
        if cfg.curve.enabled:
            make_curve_server(self._socket, cfg.curve)
        port = cfg.port if port is None else port
        try:
            self.port = bind_socket(self._socket, host, port, "trajectory receiver")
        except ValueError:
            self._shutdown_context()
            raise
        self.host = host
        self.endpoint = f"tcp://{host}:{self.port}"
        self._thread = threading.Thread(target=self._run, name="trajectory-receiver", daemon=True)
        self._thread.start()

    def counters(self) -> ReceiverCounters:
        """A consistent snapshot of the counters."""
        with self._lock:
            return ReceiverCounters(**vars(self._counters))

    @property
    def depth(self) -> int:
        """Trajectories waiting in the queue."""
        return len(self._queue)

    def get(self, timeout: float | None = None) -> TrajectoryView | None:
        """The next trajectory, or None when none arrived within `timeout` seconds (None: wait forever)."""
        batches, _ = self._take(1, timeout, wait_for_all=False)
        return batches[0].view(0) if batches else None

    def get_batch(self, n: int, timeout: float) -> list[TrajectoryView]:
        """Up to `n` trajectories as lazy views: as soon as `n` are there, or what arrived within `timeout` s."""
        return [view for batch in self.take_batches(n, timeout) for view in batch.views()]

    def take_batches(self, n: int, timeout: float) -> list[TrajectoryBatch]:
        """Up to `n` trajectories as columns (whole messages or row slices of them), in arrival order:
        as soon as `n` are there, or what arrived within `timeout` s."""
        if n < 1:
            raise ValueError(f"take_batches(n={n}): expected n >= 1")
        deadline = time.monotonic() + timeout
        batches, got = self._take(n, timeout, wait_for_all=True)
        # A queue smaller than n hands the trajectories over in several takes.
        while got < n and time.monotonic() < deadline:
            more, rows = self._take(n - got, deadline - time.monotonic(), wait_for_all=True)
            if not more:
                break
            batches.extend(more)
            got += rows
        return batches

    def _take(self, n: int, timeout: float | None, wait_for_all: bool) -> tuple[list[TrajectoryBatch], int]:
        batches, rows = self._queue.take(n, timeout, wait_for_all)
        if batches:
            with self._lock:
                self._counters.delivered += rows
        else:
            self._raise_if_dead()
        return batches, rows

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"trajectory receiver on {self.endpoint} stopped: {self._error!r}") from self._error

    def _run(self) -> None:
        # A blocking receive that gives up every _POLL_MS to look at the stop flag: no poll call per message.
        self._socket.rcvtimeo = _POLL_MS
        recv = self._socket.recv
        try:
            while not self._stop.is_set():
                try:
                    frame = recv(copy=False)
                except zmq.Again:
                    continue
                # Messages already waiting behind this one are read without blocking and queued together,
                # so a stream of small messages pays the queue's lock and the counters once per burst. A
                # burst also stops at the queue's free room (it only grows meanwhile), so "block" still
                # stops reading when the queue is full and nothing more is held than the queue would hold.
                room = min(self._queue.capacity - len(self._queue), _BURST_ROWS)
                batches: list[TrajectoryBatch] = []
                rows = messages = 0
                while True:
                    frames = [frame]
                    while frame.more:  # the rest of a multipart message is there: ZeroMQ delivers it whole
                        frame = recv(copy=False)
                        frames.append(frame)
                    messages += 1
                    try:
                        batch = decode(frames, self.max_message_bytes)
                    except MalformedMessage as err:
                        self._reject(err)
                    else:
                        batches.append(batch)
                        rows += len(batch)
                    if rows >= room or messages == _BURST_MESSAGES:
                        break
                    try:
                        frame = recv(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                if batches and not self._handle(batches, rows):
                    return
        except BaseException as err:  # kept for get() to raise: a dead receiver must not look idle
            self._error = err
        finally:
            self._socket.close(linger=0)

    def _handle(self, batches: list[TrajectoryBatch], rows: int) -> bool:
        """Queue decoded messages (`rows` trajectories in all) whole; False when stopped while waiting for room."""
        with self._lock:
            self._counters.received += len(batches)
            self._counters.accepted += rows
        if self.on_full == "block":
            return self._queue.put_all(batches, self._stop.is_set)  # meanwhile the socket is not read
        shed = self._queue.put_available(batches)
        if shed:
            with self._lock:
                self._counters.dropped_full += shed
        return True

    def _reject(self, err: MalformedMessage) -> None:
        with self._lock:
            self._counters.received += 1
            self._counters.rejected += 1
            self._counters.rejected_schema += isinstance(err, UnsupportedSchema)
            rejected = self._counters.rejected
        self.last_rejection = str(err)
        if rejected <= 10 or rejected % 1000 == 0:
            log.warning("rejected trajectory message #%d on %s: %s", rejected, self.endpoint, err)

    def _shutdown_context(self) -> None:
        release_context(self._context, self._auth)

    def close(self) -> None:
        """Stop the thread and close the socket; queued trajectories stay readable."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._shutdown_context()

    def __enter__(self) -> "TrajectoryReceiver":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
