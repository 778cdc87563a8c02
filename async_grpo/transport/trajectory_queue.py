"""The learner's bounded hand-off between the receiving thread and the training loop.

It holds whole decoded messages (`TrajectoryBatch`es, or anything with `len` and `rows(start, stop)`)
and counts trajectories, not messages: it never holds more than `capacity` trajectories. The receiving
thread puts the messages it read in one go with one lock round-trip; a message larger than the room
left goes in as row slices while room appears (no copy: a slice shares the message's tensors). The
learner takes up to n trajectories as a few slices with one lock round-trip, the last one cut to fit,
and is told how many it got. A taker waiting for n trajectories is woken once when n are there, not
at every put, so the two threads do not trade the GIL per message.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Generic, Protocol, Sequence, TypeVar


class RowBatch(Protocol):
    def __len__(self) -> int: ...

    def rows(self, start: int, stop: int) -> "RowBatch": ...


Batch = TypeVar("Batch", bound=RowBatch)


class BoundedBatchQueue(Generic[Batch]):
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"queue capacity = {capacity}: expected >= 1 trajectories")
        self.capacity = capacity
        self._batches: deque[tuple[Batch, int]] = deque()  # (batch, its length): no len() call per take
        self._rows = 0  # trajectories held, all batches together
        self._lock = threading.Lock()
        self._filled = threading.Condition(self._lock)  # a taker waits here for `_wanted` trajectories
        self._drained = threading.Condition(self._lock)  # a blocked putter waits here for room
        self._wanted = 0  # largest count a waiting taker needs (0: nobody waits)

    def __len__(self) -> int:
        """Trajectories waiting."""
        return self._rows

    def _add(self, batch: Batch, start: int, stop: int, whole: bool) -> None:
        self._batches.append((batch if whole else batch.rows(start, stop), stop - start))
        self._rows += stop - start
        if self._wanted and self._rows >= self._wanted:
            self._filled.notify_all()

    def put_all(self, batches: Sequence[Batch], stopped: Callable[[], bool], poll_s: float = 0.1) -> bool:
        """Enqueue every trajectory of `batches`, in order, waiting for room as needed; False if `stopped()`
        turned true first."""
        with self._lock:
            for batch in batches:
                total = len(batch)
                start = 0
                while start < total:
                    room = self.capacity - self._rows
                    if room > 0:
                        stop = min(total, start + room)
                        self._add(batch, start, stop, whole=start == 0 and stop == total)
                        start = stop
                    elif stopped():
                        return False
                    else:
                        # The queue is full, so any waiting taker can be satisfied by what is there now.
                        self._filled.notify_all()
                        self._drained.wait(poll_s)
        return True

    def put_available(self, batches: Sequence[Batch]) -> int:
        """Enqueue what fits of `batches`, in order, without waiting; returns how many trajectories were shed."""
        shed = 0
        with self._lock:
            for batch in batches:
                total = len(batch)
                fits = min(total, max(0, self.capacity - self._rows))
                if fits:
                    self._add(batch, 0, fits, whole=fits == total)
                shed += total - fits
        return shed

    def take(self, n: int, timeout: float | None, wait_for_all: bool) -> tuple[list[Batch], int]:
        """Batches of up to `n` trajectories in all, and how many trajectories they hold; waits up to
        `timeout` s (None: forever) for 1 trajectory, or for `n` if `wait_for_all`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # A full queue can never reach more than `capacity`: wait for at most that.
        want = min(n, self.capacity) if wait_for_all else 1
        with self._lock:
            while self._rows < want:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._wanted = max(self._wanted, want)
                self._filled.wait(left)
                self._wanted = 0
            taken: list[Batch] = []
            got = need = min(n, self._rows)
            while need:
                head, size = self._batches[0]
                if size <= need:
                    taken.append(head)
                    self._batches.popleft()
                else:  # cut the head: its first `need` rows go, the rest stays first in line
                    taken.append(head.rows(0, need))
                    self._batches[0] = (head.rows(need, size), size - need)
                    size = need
                self._rows -= size
                need -= size
            if taken:
                self._drained.notify_all()
        return taken, got
