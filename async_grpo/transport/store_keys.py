"""Keys of the torch.distributed store (torchrun's TCPStore) through which the roles coordinate.

The store carries only small control values, never trajectories or weights: where the learner listens
(endpoints.py), where each worker group's prompt stream resumes, how many trajectories the learner has
taken from each worker group (the workers' flow control), and the stop signal.
"""

from __future__ import annotations

RESUME_POSITIONS = "async_grpo/resume_positions"  # JSON {worker group: next prompt position}
STOP = "async_grpo/stop"  # set by learner rank 0 when the run ends ("1") or fails ("error")


def taken_key(worker_group: int) -> str:
    """Trajectories of `worker_group` the learner has taken off its queue (used or dropped as stale)."""
    return f"async_grpo/taken/{worker_group}"
