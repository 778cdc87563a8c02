"""The learner's bounded hand-off (transport/trajectory_queue.py) on its own: several messages put with
one call keep their order, are cut to the room left, and takes report how many trajectories they hold."""

from __future__ import annotations

import threading

from async_grpo.transport.trajectory_queue import BoundedBatchQueue


class Rows:
    """A stand-in message: a run of trajectory numbers, cut by rows like a TrajectoryBatch."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def rows(self, start: int, stop: int) -> "Rows":
        return Rows(self.start + start, self.start + stop)

    def ids(self) -> list[int]:
        return list(range(self.start, self.stop))


def ids(batches: list[Rows]) -> list[int]:
    return [i for batch in batches for i in batch.ids()]


def test_put_available_queues_messages_in_order_and_sheds_what_does_not_fit():
    queue = BoundedBatchQueue(6)
    shed = queue.put_available([Rows(0, 3), Rows(3, 7), Rows(7, 9)])
    assert (shed, len(queue)) == (3, 6)  # the second message cut to the room left, the third shed whole
    batches, got = queue.take(10, timeout=0, wait_for_all=False)
    assert (ids(batches), got, len(queue)) == ([0, 1, 2, 3, 4, 5], 6, 0)


def test_take_cuts_the_head_and_reports_the_trajectories_it_hands_over():
    queue = BoundedBatchQueue(100)
    assert queue.put_available([Rows(0, 4), Rows(4, 5), Rows(5, 12)]) == 0
    first, got = queue.take(6, timeout=0, wait_for_all=True)
    assert ([len(b) for b in first], got) == ([4, 1, 1], 6)
    rest, got = queue.take(100, timeout=0, wait_for_all=False)
    assert (ids(rest), got) == (list(range(6, 12)), 6)
    assert queue.take(1, timeout=0, wait_for_all=False) == ([], 0)


def test_put_all_of_several_messages_waits_for_room_and_keeps_their_order():
    queue = BoundedBatchQueue(4)
    done = threading.Event()

    def put() -> None:
        if queue.put_all([Rows(0, 3), Rows(3, 6), Rows(6, 10)], lambda: False, poll_s=0.01):
            done.set()

    putter = threading.Thread(target=put)
    putter.start()
    taken: list[int] = []
    while len(taken) < 10:
        batches, got = queue.take(3, timeout=5, wait_for_all=False)
        assert got == len(ids(batches)) and len(queue) <= 4
        taken += ids(batches)
    putter.join(timeout=5)
    assert done.is_set() and taken == list(range(10))


def test_put_all_gives_up_when_stopped_while_the_queue_is_full():
    queue = BoundedBatchQueue(2)
    assert queue.put_all([Rows(0, 2)], lambda: False)
    assert not queue.put_all([Rows(2, 3), Rows(3, 4)], lambda: True, poll_s=0.01)
    assert len(queue) == 2
