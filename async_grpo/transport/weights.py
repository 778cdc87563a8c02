"""Weight broadcast from learner rank 0 to the rollout worker groups, one sync group each.

Learner side, `WeightPublisher.publish(version, named_tensors)`: packs the full tensors (the
learner's export, gathered by all learner ranks together) into per-dtype buckets, a copy that is
the snapshot to send, and hands it to one background thread per sync group, then returns so training
goes on. Snapshot buffers are reused across versions: a buffer set goes back to a small spare pool
once no group is sending it or holds it queued, and the next version is copied into a spare of the
same layout, so a broadcast in flight is never overwritten (double buffering; a third set appears
only while one group is still sending an old version and another version waits queued). Each thread broadcasts meta, header and buckets on its group (weight_buckets.py has the
protocol). A group still busy with an older version is handed only the newest snapshot next, so a
slow group skips versions instead of queueing them. Every collective waits at most `timeout_s`; a
group whose peers never join fails with `SyncTimeout` naming the group and version, is marked dead
and dropped, and the other groups carry on.

Worker side, `WeightReceiver.receive()`: every rank of a worker group joins the same broadcasts and
gets the full tensors (the model keeps its tensor-parallel shard when it loads them). It receives
into the buffers of its previous broadcast when the layout is the same, so the tensors it returns
are valid until its next `receive` (the caller copies what it keeps, as the model's load does). It
times out the same way, so neither side of a lost peer hangs.

`WeightSender` is the narrow interface the learner uses; a one-broadcast-to-all-workers sender or a
per-node relay can replace `WeightPublisher` behind it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterable, Protocol

import torch
import torch.distributed as dist

from async_grpo.transport.control import WeightsAnnouncer
from async_grpo.transport.sync_groups import LEARNER_SRC_RANK
from async_grpo.transport.weight_buckets import (
    MAGIC,
    META_LEN,
    Bucket,
    BucketSpec,
    PackedWeights,
    decode_header,
    encode_header,
    pack_weights_into,
    unpack_buckets,
)

log = logging.getLogger(__name__)

_SPARE_SNAPSHOTS = 2  # idle buffer sets kept for reuse; more would only hold memory


class SyncError(RuntimeError):
    """A weight broadcast failed (a peer left, or the group is broken)."""


class SyncTimeout(SyncError, TimeoutError):
    """A weight broadcast that a peer did not join within the timeout."""


def _group_ranks(group: dist.ProcessGroup) -> list[int]:
    try:
        return dist.get_process_group_ranks(group)
    except Exception:  # noqa: BLE001 - only used to make messages clearer
        return []


def _device_for(group: dist.ProcessGroup) -> torch.device:
    """NCCL sends from and into CUDA memory; every other backend from the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_with_timeout(
    tensor: torch.Tensor, src: int, group: dist.ProcessGroup, timeout_s: float, what: str
) -> None:
    """dist.broadcast that raises SyncTimeout / SyncError (with `what` in the message) instead of hanging."""
    try:
        work = dist.broadcast(tensor, src=src, group=group, async_op=True)
        completed = work.wait(timeout=timedelta(seconds=timeout_s))
    except Exception as err:  # the backends raise RuntimeError subclasses with free-text messages
        text = str(err)
        if "timed out" in text.lower() or "timeout" in text.lower():
            raise SyncTimeout(f"{what}: a peer did not join within {timeout_s} s ({text.splitlines()[0]})") from err
        raise SyncError(f"{what} failed: {text.splitlines()[0] if text else type(err).__name__}") from err
    if completed is False:
        raise SyncTimeout(f"{what}: a peer did not join within {timeout_s} s")


@dataclass(frozen=True)
class WeightSnapshot:
    """One version packed for sending; shared read-only by all group threads."""

    version: int
    meta: torch.Tensor  # [META_LEN] int64
    header: torch.Tensor  # [header_bytes] uint8
    buckets: list[Bucket]
    packed: PackedWeights | None = None  # the reusable buffer set the buckets live in

    @property
    def nbytes(self) -> int:
        return sum(b.data.numel() * b.data.element_size() for b in self.buckets)


@dataclass
class GroupStatus:
    """What one sync group has received, and whether it is still served."""

    name: str
    ranks: list[int]
    sent_version: int | None = None
    dead: bool = False
    error: str | None = None
    last_send_s: float = 0.0
    bytes_sent: int = 0


class WeightSender(Protocol):
    """How the learner hands new weights to the rollout workers."""

    def publish(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def wait_idle(self, timeout: float | None = None) -> bool: ...

    def status(self) -> dict[str, GroupStatus]: ...

    def close(self) -> None: ...


def send_snapshot(snapshot: WeightSnapshot, group: dist.ProcessGroup, src: int, timeout_s: float, name: str) -> None:
    """Broadcast meta, header and every bucket of `snapshot` on `group` (the sender's half)."""
    what = f"weight sync to group '{name}' (ranks {_group_ranks(group)}) for version {snapshot.version}"
    broadcast_with_timeout(snapshot.meta, src, group, timeout_s, what)
    broadcast_with_timeout(snapshot.header, src, group, timeout_s, what)
    for bucket in snapshot.buckets:
        if bucket.data.numel():  # a bucket of empty tensors only has nothing to send
            broadcast_with_timeout(bucket.data.view(torch.uint8), src, group, timeout_s, what)


class _GroupSender:
    """One thread serving one sync group from a one-slot mailbox holding the newest snapshot.

    Every snapshot it is offered is handed back through `release` exactly once: when sent, when
    replaced in the mailbox unsent, or when the group dies.
    """

    def __init__(self, name: str, group: dist.ProcessGroup, src: int, timeout_s: float,
                 announcer: WeightsAnnouncer | None, finished: threading.Condition,
                 release: Callable[[WeightSnapshot], None]):
        self._finished = finished  # the publisher's: notified whenever this group ends a broadcast
        self._release = release
        self.status = GroupStatus(name=name, ranks=_group_ranks(group))
        self._group, self._src, self._timeout_s, self._announcer = group, src, timeout_s, announcer
        self._slot: WeightSnapshot | None = None
        self._busy = False
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"weight-sender-{name}", daemon=True)
        self._thread.start()

    def offer(self, snapshot: WeightSnapshot) -> bool:
        """Queue `snapshot` (replacing an older one nobody started sending); False if the group is dead."""
        with self._cond:
            if self.status.dead:
                return False
            replaced, self._slot = self._slot, snapshot
            self._cond.notify_all()
        if replaced is not None:
            self._release(replaced)
        return True

    def idle(self) -> bool:
        with self._cond:
            return self.status.dead or (self._slot is None and not self._busy)

    def _run(self) -> None:
        name = self.status.name
        while True:
            with self._cond:
                while self._slot is None and not self._closing:
                    self._cond.wait()
                if self._slot is None:
                    return
                snapshot, self._slot, self._busy = self._slot, None, True
            if self._announcer is not None:
                self._announcer.begin(name, snapshot.version)
            started = time.monotonic()
            try:
                send_snapshot(snapshot, self._group, self._src, self._timeout_s, name)
                if snapshot.meta.is_cuda:  # the buffers may be refilled once released: the GPU must be done reading
                    torch.cuda.current_stream(snapshot.meta.device).synchronize()
            except Exception as err:  # SyncError, or anything else: either way this group is lost
                log.error("%s; group '%s' is marked dead and gets no further weights", err, name)
                with self._cond:
                    self.status.dead, self.status.error, self._busy = True, str(err), False
                    queued, self._slot = self._slot, None
                self._release(snapshot)
                if queued is not None:
                    self._release(queued)
                self._notify_finished()
                return
            finally:
                if self._announcer is not None:
                    self._announcer.end(name)
            self._release(snapshot)
            with self._cond:
                self.status.sent_version = snapshot.version
                self.status.last_send_s = time.monotonic() - started
                self.status.bytes_sent += snapshot.nbytes
                self._busy = False
            self._notify_finished()

    def _notify_finished(self) -> None:
        with self._finished:
            self._finished.notify_all()

    def close(self, timeout: float) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)


class WeightPublisher:
    """Learner rank 0: sends each new version to every live sync group from background threads."""

    def __init__(
        self,
        sync_groups: dict[str, dist.ProcessGroup],
        bucket_mb: float = 256.0,
        timeout_s: float = 300.0,
        announcer: WeightsAnnouncer | None = None,
        src_rank: int = LEARNER_SRC_RANK,
        device: torch.device | str | None = None,
    ):
        if bucket_mb <= 0 or timeout_s <= 0:
            raise ValueError(f"bucket_mb = {bucket_mb}, timeout_s = {timeout_s}: expected both > 0")
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.timeout_s = timeout_s
        # One snapshot serves every group: on the GPU when any group speaks NCCL (gloo sends CUDA tensors too).
        devices = {_device_for(g) for g in sync_groups.values()}
        self.device = torch.device(device) if device is not None else max(devices, key=lambda d: d.type == "cuda",
                                                                            default=torch.device("cpu"))
        self.latest_version: int | None = None
        self._finished = threading.Condition()
        self._pool_lock = threading.Lock()
        self._users: dict[PackedWeights, int] = {}  # buffer set -> senders holding it (queued or sending)
        self._spare: list[PackedWeights] = []  # buffer sets no sender holds: the next versions' destinations
        self._senders = {
            name: _GroupSender(name, group, src_rank, timeout_s, announcer, self._finished, self._release)
            for name, group in sync_groups.items()
        }

    def publish(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Snapshot the weights as `version` and start sending them; returns once the copy is made."""
        if self.latest_version is not None and version <= self.latest_version:
            raise ValueError(f"weights version {version}: expected more than the last published {self.latest_version}")
        with self._pool_lock:
            spare = self._spare.pop() if self._spare else None
        packed = pack_weights_into(named_tensors, spare, self.bucket_bytes, self.device)
        header = encode_header(version, packed.buckets)
        meta = torch.tensor([MAGIC, version, len(header), len(packed.buckets)], dtype=torch.int64, device=self.device)
        header_tensor = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device)  # [header_bytes]
        if self.device.type == "cuda":
            # The sender threads use their own streams: the copies must be finished before they read.
            torch.cuda.current_stream(self.device).synchronize()
        snapshot = WeightSnapshot(version, meta, header_tensor, packed.buckets, packed)
        self.latest_version = version
        with self._pool_lock:
            # One count for the loop below, so the set cannot turn spare while it is still being offered.
            self._users[packed] = 1
        for sender in self._senders.values():
            with self._pool_lock:
                self._users[packed] += 1
            if not sender.offer(snapshot):
                self._release(snapshot)
        self._release(snapshot)

    def _release(self, snapshot: WeightSnapshot) -> None:
        """A holder is done with `snapshot`; its buffers turn spare when it was the last one."""
        packed = snapshot.packed
        if packed is None:
            return
        with self._pool_lock:
            self._users[packed] -= 1
            if self._users[packed] == 0:
                del self._users[packed]
                if len(self._spare) < _SPARE_SNAPSHOTS:
                    self._spare.append(packed)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every live group has the newest version (or died); False on timeout."""
        with self._finished:
            return self._finished.wait_for(lambda: all(s.idle() for s in self._senders.values()), timeout)

    def status(self) -> dict[str, GroupStatus]:
        return {name: GroupStatus(**vars(s.status)) for name, s in self._senders.items()}

    def close(self) -> None:
        """Stop the threads after their current broadcast (each ends within the timeout)."""
        for sender in self._senders.values():
            sender.close(self.timeout_s + 5)


class WeightReceiver:
    """A worker rank: joins the broadcasts of its sync group and returns the full named tensors."""

    def __init__(
        self,
        sync_group: dist.ProcessGroup,
        src_rank: int = LEARNER_SRC_RANK,
        timeout_s: float = 300.0,
        name: str = "sync",
        device: torch.device | str | None = None,
    ):
        self.group, self.src_rank, self.timeout_s, self.name = sync_group, src_rank, timeout_s, name
        self.device = torch.device(device) if device is not None else _device_for(sync_group)
        # The previous broadcast's layout, buffers and named views: reused while the layout repeats.
        self._specs: list[BucketSpec] | None = None
        self._datas: list[torch.Tensor] = []
        self._views: dict[str, torch.Tensor] = {}

    def receive(
        self, timeout: float | None = None, expected_version: int | None = None
    ) -> tuple[int, dict[str, torch.Tensor]]:
        """Join the next broadcast; (version, {name: full tensor}). Raises SyncTimeout after `timeout` s.

        The tensors are views of buffers the next receive of the same layout overwrites: copy what you keep.
        """
        timeout_s = self.timeout_s if timeout is None else timeout
        version_text = "the next version" if expected_version is None else f"version {expected_version}"
        what = f"weight sync on group '{self.name}' (ranks {_group_ranks(self.group)}) for {version_text}"
        meta = torch.zeros(META_LEN, dtype=torch.int64, device=self.device)
        broadcast_with_timeout(meta, self.src_rank, self.group, timeout_s, what)
        magic, version, header_bytes, num_buckets = (int(x) for x in meta.tolist())
        if magic != MAGIC:
            raise SyncError(f"{what}: first tensor starts with {magic:#x}, expected the weight-sync magic {MAGIC:#x}")
        what = f"weight sync on group '{self.name}' (ranks {_group_ranks(self.group)}) for version {version}"
        header = torch.empty(header_bytes, dtype=torch.uint8, device=self.device)
        broadcast_with_timeout(header, self.src_rank, self.group, timeout_s, what)
        specs = decode_header(header.cpu().numpy().tobytes(), version, num_buckets)
        if self._specs is None or [(s.dtype, s.numel) for s in specs] != [(s.dtype, s.numel) for s in self._specs]:
            self._specs, self._views = None, {}  # a failed allocation must not leave a stale layout behind
            self._datas = [torch.empty(spec.numel, dtype=spec.dtype, device=self.device) for spec in specs]  # [numel]
        for spec, data in zip(specs, self._datas):
            if spec.numel:
                broadcast_with_timeout(data.view(torch.uint8), self.src_rank, self.group, timeout_s, what)
        if specs != self._specs:  # same buffers, different names or shapes inside them
            self._views = unpack_buckets(specs, self._datas)
        self._specs = specs
        return version, dict(self._views)
