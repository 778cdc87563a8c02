"""The learner's trajectory intake (learner/loop.py collect_step) over a real stream: staleness judged on
each message's policy_version column, counted per trajectory, and the taken counts per worker group."""

from __future__ import annotations

import pytest

from async_grpo.config import TransportConfig
from async_grpo.learner.loop import NoTrajectories, TakenCounts, collect_step
from async_grpo.transport.stream import TrajectoryReceiver, TrajectoryStream
from async_grpo.transport.trajectory_batch import TrajectoryBatch


def group(group_id: int, versions: list[int], worker_id: int) -> TrajectoryBatch:
    n = len(versions)
    return TrajectoryBatch.from_group(
        [7, group_id], [[group_id, i] for i in range(n)], [[-0.5, -0.25]] * n, [float(group_id * 10 + i) for i in range(n)],
        [0.5] * n, group_id=group_id, sample_indices=list(range(n)), policy_versions=versions,
        finish_reasons=["length"] * n, worker_id=worker_id)


def test_collect_step_drops_and_counts_stale_rows_and_keeps_the_fresh_ones_in_order():
    with TrajectoryReceiver(TransportConfig()) as receiver, TrajectoryStream(receiver.endpoint, TransportConfig()) as stream:
        stream.push(group(1, [5, 2, 4, 6], worker_id=0), timeout=10)  # at version 5, max_staleness 1: 2 is stale, 6 ahead
        stream.push(group(2, [3, 3], worker_id=1), timeout=10)  # both stale
        stream.push(group(3, [5, 5, 5], worker_id=0), timeout=10)
        taken = TakenCounts(store=None)
        intake = collect_step(receiver, 4, version=5, max_staleness=1, timeout_s=10, taken=taken)
    assert [t.reward for t in intake.trajectories] == [10.0, 12.0, 30.0, 31.0]
    assert intake.staleness == [0, 1, 0, 0]
    assert intake.dropped_stale == 4  # 2 and 6 of group 1, both of group 2
    assert [t.completion_ids.tolist() for t in intake.trajectories] == [[1, 0], [1, 2], [3, 0], [3, 1]]
    assert taken.counts == {0: 6, 1: 2}  # every row taken from the queue, stale or not


def test_collect_step_fails_after_the_timeout_when_only_stale_work_arrives():
    with TrajectoryReceiver(TransportConfig()) as receiver, TrajectoryStream(receiver.endpoint, TransportConfig()) as stream:
        stream.push(group(1, [0, 0], worker_id=0), timeout=10)
        with pytest.raises(NoTrajectories, match="no trajectory reached the learner for 2 s"):
            collect_step(receiver, 2, version=9, max_staleness=1, timeout_s=2)
