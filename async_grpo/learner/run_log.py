"""What a run leaves behind for people: metrics.jsonl, TensorBoard events, a console line, reward.png.

Learner rank 0 owns one `RunLog`. `metrics.jsonl` gets one JSON object per learner step (appended and
flushed at once, so a killed run keeps every finished step; a resumed run drops lines past its
checkpoint so no step appears twice). TensorBoard and matplotlib are optional: without them the run
still trains and logs JSON.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
REWARD_PLOT = "reward.png"


class RunLog:
    def __init__(self, out_dir: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE
        self._truncate_after(resume_step)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed: metrics go to %s only", self.path)

    def _truncate_after(self, step: int) -> None:
        """Keep only lines of steps <= `step` (a resumed run redoes nothing it has logged).

        A line cut short by a kill (no complete JSON object) is dropped too: its step is redone.
        """
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("step", step + 1) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps(metrics, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value) and key != "step":
                    self._tb.add_scalar(key, value, metrics["step"])

    @staticmethod
    def console_line(m: dict[str, Any], max_steps: int) -> str:
        return (
            f"step {m['step']:>5}/{max_steps}  reward {m['reward_mean']:.3f}  loss {m.get('loss', float('nan')):+.4f}"
            f"  tok/s {m['tokens_per_s']:8.0f}  samples/s {m['samples_per_s']:6.1f}"
            f"  staleness {m['staleness_max']}  queue {m['queue_depth']}  v{m['policy_version']}"
        )

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        self.plot_reward()

    def plot_reward(self) -> Path | None:
        """reward.png: mean reward per step (and its 10-step running mean) over the whole run."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.info("matplotlib is not installed: no %s", REWARD_PLOT)
            return None
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        if not rows:
            return None
        steps = [r["step"] for r in rows]
        reward = [r["reward_mean"] for r in rows]
        window = [sum(reward[max(0, i - 9) : i + 1]) / len(reward[max(0, i - 9) : i + 1]) for i in range(len(reward))]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        ax.plot(steps, reward, lw=0.8, alpha=0.5, label="reward (step mean)")
        ax.plot(steps, window, lw=2, label="10-step mean")
        ax.set_xlabel("learner step")
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        out = self.out_dir / REWARD_PLOT
        fig.savefig(out)
        plt.close(fig)
        return out
