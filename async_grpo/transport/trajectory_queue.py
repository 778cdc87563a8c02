"""The learner's bounded hand-off between the receiving thread and the training loop.

A deque under one lock, filled and drained many trajectories at a time: the receiving thread puts a
whole decoded message with one lock round-trip and the learner takes a whole batch with one, which
`queue.Queue` (a lock round-trip per item on each side) cannot do. A taker waiting for n items is
woken once when n are there, not at every put, so the two threads do not trade the GIL per message.
It never holds more than `capacity` items.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Generic, Sequence, TypeVar

Item = TypeVar("Item")


class BoundedBatchQueue(Generic[Item]):
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"queue capacity = {capacity}: expected >= 1")
        self.capacity = capacity
        self._items: deque[Item] = deque()
        self._lock = threading.Lock()
        self._filled = threading.Condition(self._lock)  # a taker waits here for `_wanted` items
        self._drained = threading.Condition(self._lock)  # a blocked putter waits here for room
        self._wanted = 0  # largest count a waiting taker needs (0: nobody waits)

    def __len__(self) -> int:
        return len(self._items)

    def _added(self) -> None:
        if self._wanted and len(self._items) >= self._wanted:
            self._filled.notify_all()

    def put_all(self, items: Sequence[Item], stopped: Callable[[], bool], poll_s: float = 0.1) -> bool:
        """Enqueue every item, waiting for room as needed; False if `stopped()` turned true first."""
        start = 0
        with self._lock:
            while start < len(items):
                room = self.capacity - len(self._items)
                if room > 0:
                    self._items.extend(items[start : start + room])
                    start += room
                    self._added()
                elif stopped():
                    return False
                else:
                    # The queue is full, so any waiting taker can be satisfied by what is there now.
                    self._filled.notify_all()
                    self._drained.wait(poll_s)
        return True

    def put_available(self, items: Sequence[Item]) -> int:
        """Enqueue what fits without waiting; returns how many items were shed."""
        with self._lock:
            room = max(0, self.capacity - len(self._items))
            self._items.extend(items[:room])
            self._added()
        return max(0, len(items) - room)

    def take(self, n: int, timeout: float | None, wait_for_all: bool) -> list[Item]:
        """Up to `n` items; waits up to `timeout` s (None: forever) for 1 item, or for `n` if `wait_for_all`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # A full queue can never reach more than `capacity`: wait for at most that.
        want = min(n, self.capacity) if wait_for_all else 1
        with self._lock:
            while len(self._items) < want:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._wanted = max(self._wanted, want)
                self._filled.wait(left)
                self._wanted = 0
            count = min(n, len(self._items))
            taken = [self._items.popleft() for _ in range(count)]
            if taken:
                self._drained.notify_all()
        return taken
