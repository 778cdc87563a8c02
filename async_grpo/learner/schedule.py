"""Learning-rate schedule of the learner: linear warm-up, then constant, cosine or linear decay.

`lr_multiplier(step)` is the factor on `learner.lr` for optimiser step `step` (0-based); the engine
hands it to a `torch.optim.lr_scheduler.LambdaLR`, which DeepSpeed steps once per optimiser step and
saves in its checkpoints. Decay runs from the end of warm-up to `decay_steps` (default: the run's
`trainer.max_steps`) and ends at `lr * min_lr_ratio`.
"""

from __future__ import annotations

import math
from typing import Callable


def lr_multiplier(step: int, warmup_steps: int, decay_steps: int, schedule: str, min_lr_ratio: float = 0.0) -> float:
    """Factor on the peak learning rate at optimiser step `step` (0-based)."""
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"learner.lr_schedule = {schedule!r}: expected constant, cosine or linear")
    if warmup_steps > 0 and step < warmup_steps:
        # Step 0 already trains, with lr / warmup_steps.
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(decay_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def make_lr_lambda(warmup_steps: int, decay_steps: int, schedule: str, min_lr_ratio: float) -> Callable[[int], float]:
    """`lr_multiplier` with the schedule bound, validated once, for LambdaLR."""
    lr_multiplier(0, warmup_steps, decay_steps, schedule, min_lr_ratio)
    return lambda step: lr_multiplier(step, warmup_steps, decay_steps, schedule, min_lr_ratio)
