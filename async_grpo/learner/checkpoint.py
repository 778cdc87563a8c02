"""Learner checkpoints: written whole or not at all, resumed exactly, pruned to the newest few.

Layout under `<out_dir>/checkpoints/`:

    step_00000012/                 a complete checkpoint (only ever appears by an atomic rename)
        deepspeed/state/...        DeepSpeed's save_checkpoint: model, optimiser, LR scheduler (per rank)
        learner_rank{r}.pt         ours: step, policy version, data position, RNG states of rank r
        complete.json              written by rank 0 last, before the rename
    .tmp-step_00000012/            being written (or left behind by a crash): never loaded, and
                                   deleted by the next save

Every learner rank writes its part into the temporary directory; after a barrier on the learner
group rank 0 writes the marker, renames the directory and prunes old checkpoints to
`trainer.keep_checkpoints`; a second barrier lets every rank return only once the checkpoint exists.
The data position is an opaque dict from the caller (how far the prompt stream has read); RNG states
(python, numpy, torch, CUDA) make a resumed run draw the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from async_grpo.learner.engine import Learner

CHECKPOINT_DIR = "checkpoints"
_COMPLETE = re.compile(r"^step_(\d{8})$")
_TEMP_PREFIX = ".tmp-"
_MARKER = "complete.json"
_DS_SUBDIR, _DS_TAG = "deepspeed", "state"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `out_dir`, oldest first (temporary directories are never listed)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _COMPLETE.match(p.name)) and (p / _MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest_complete(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `out_dir`, or None."""
    done = complete_checkpoints(out_dir)
    return done[-1] if done else None


def remove_partial_checkpoints(out_dir: str | Path) -> list[Path]:
    """Delete temporary directories that a crash left mid-write (never loadable); returns what went."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    partial = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_TEMP_PREFIX)]
    for path in partial:
        shutil.rmtree(path)
    return partial


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(learner: "Learner", out_dir: str | Path, data_position: dict[str, Any], keep: int) -> str:
    """Collective over the learner group; returns the complete checkpoint's directory."""
    if keep < 1:
        raise ValueError(f"trainer.keep_checkpoints = {keep!r}: expected >= 1")
    root = checkpoint_root(out_dir)
    name = f"step_{learner.step_count:08d}"
    temp, final = root / f"{_TEMP_PREFIX}{name}", root / name
    if learner.rank == 0:
        remove_partial_checkpoints(out_dir)
        temp.mkdir(parents=True)
    dist.barrier(group=learner.group)
    learner.engine.save_checkpoint(str(temp / _DS_SUBDIR), tag=_DS_TAG, save_latest=False)
    ours = {
        "step": learner.step_count,
        "policy_version": learner.policy_version,
        "data_position": data_position,
        "rng": _rng_state(),
        "world_size": learner.world_size,
    }
    torch.save(ours, temp / f"learner_rank{learner.rank}.pt")
    dist.barrier(group=learner.group)
    if learner.rank == 0:
        (temp / _MARKER).write_text(json.dumps({"step": learner.step_count, "world_size": learner.world_size}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        temp.rename(final)
        for old in complete_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old)
    dist.barrier(group=learner.group)
    return str(final)


def load_checkpoint(learner: "Learner", path: str | Path) -> dict[str, Any]:
    """Collective over the learner group: restore engine, counters and RNG; returns the data position."""
    path = Path(path)
    if path.name.startswith(_TEMP_PREFIX) or not (path / _MARKER).is_file():
        raise ValueError(f"checkpoint {str(path)!r} is not complete (no {_MARKER}); expected a directory "
                         f"listed by latest_complete()")
    marker = json.loads((path / _MARKER).read_text())
    if marker["world_size"] != learner.world_size:
        raise ValueError(f"checkpoint {str(path)!r} was written by {marker['world_size']} learner ranks; "
                         f"this learner has {learner.world_size} (resume with the same learner.num_ranks)")
    loaded, _ = learner.engine.load_checkpoint(str(path / _DS_SUBDIR), tag=_DS_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed found no state under {str(path / _DS_SUBDIR)!r}")
    ours = torch.load(path / f"learner_rank{learner.rank}.pt", weights_only=False)
    learner.step_count = ours["step"]
    learner.policy_version = ours["policy_version"]
    _set_rng_state(ours["rng"])
    return ours["data_position"]
