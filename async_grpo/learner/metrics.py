"""Step metrics of the learner: per-micro-batch sums, reduced once per step over all learner ranks.

The loss module returns additive sums (`loss`, `tokens`, `clipped`, ...) and maxima; this module
adds them over a rank's micro-batches, then does ONE all_reduce for the sums and one for the maxima
on the learner group, so every rank ends the step with the same numbers and the same collective
sequence (a rank never skips a collective its peers call).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from async_grpo.learner.loss import PolicyLoss


class StepMetrics:
    """Accumulates `PolicyLoss` metric sums over micro-batches and reduces them across ranks."""

    def __init__(self) -> None:
        # Kept as tensors on the learner's device: no host sync per micro-batch.
        self._sums: dict[str, torch.Tensor] = {}
        self._maxes: dict[str, torch.Tensor] = {}

    def add(self, part: PolicyLoss) -> None:
        for key, value in part.sums.items():
            value = value.detach().double()
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        for key, value in part.maxes.items():
            value = value.detach().double()
            self._maxes[key] = torch.maximum(self._maxes[key], value) if key in self._maxes else value

    def reduce(self, group: dist.ProcessGroup | None = None,
               device: torch.device | str = "cpu") -> dict[str, float]:
        """Global metrics of the step; a collective on `group` when torch.distributed is initialised.

        device: where the reduced tensors live (the learner's device: NCCL reduces no host tensors).
        """
        sum_keys, max_keys = sorted(self._sums), sorted(self._maxes)
        sums = torch.stack([self._sums[k].to(device) for k in sum_keys]) if sum_keys else \
            torch.zeros(0, dtype=torch.float64, device=device)  # [num_sum_keys]
        maxes = torch.stack([self._maxes[k].to(device) for k in max_keys]) if max_keys else \
            torch.zeros(0, dtype=torch.float64, device=device)  # [num_max_keys]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
        total = dict(zip(sum_keys, sums.cpu().tolist()))
        tokens = max(total.get("tokens", 0.0), 1.0)
        out = {
            "loss": total.get("loss", 0.0),
            "kl": total.get("kl", 0.0),
            "tokens": total.get("tokens", 0.0),
            "clip_frac": total.get("clipped", 0.0) / tokens,
            "approx_kl": total.get("approx_kl", 0.0) / tokens,
            "entropy": total.get("entropy", 0.0) / tokens,
            "is_weight_mean": total.get("is_weight", 0.0) / tokens,
            "truncated_frac": total.get("truncated", 0.0) / tokens,
        }
        out.update(dict(zip(max_keys, maxes.cpu().tolist())))
        return out
