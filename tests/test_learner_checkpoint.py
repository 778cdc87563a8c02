"""Checkpoints: resume continues exactly; half-written checkpoints are never loaded; old ones are pruned."""

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from async_grpo.learner.checkpoint import complete_checkpoints, latest_complete, load_checkpoint
from test_learner_zero_parity import _free_port, make_config, make_model, make_step, run_ranks


def _optimizer_tensors(learner) -> list[torch.Tensor]:
    # The base optimiser's per-partition slots in creation order (ZeRO-3 keys them by flat tensors
    # that are not in its param_groups, so state_dict() cannot be used).
    state = learner.optimizer.optimizer.state
    return [t.detach().clone() for slot in state.values() for _, t in sorted(slot.items())
            if isinstance(t, torch.Tensor)]


def _snapshot(learner) -> dict:
    from async_grpo.learner.weight_export import full_state_dict

    return {"params": full_state_dict(learner.engine), "optim": _optimizer_tensors(learner),
            "step": learner.step_count, "version": learner.policy_version,
            "lr": learner.lr_scheduler.get_last_lr()[0]}


def _resume_main(rank: int, world: int, port: int, zero_stage: int, out_dir: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))
    from async_grpo.learner.engine import Learner

    cfg = make_config(zero_stage, 1)
    cfg.trainer.keep_checkpoints = 2
    cfg.learner.lr_schedule = "cosine"  # the scheduler's position must be restored too
    cfg.trainer.max_steps = 6

    first = Learner(cfg, make_model())
    first.step(make_step(0))
    first.save_checkpoint(out_dir, {"prompts_read": 6})
    first.step(make_step(1))
    saved = first.save_checkpoint(out_dir, {"prompts_read": 12})
    draw_after_save = torch.rand(3)
    for s in (2, 3):
        first.step(make_step(s))
    straight = _snapshot(first)
    first.save_checkpoint(out_dir, {"prompts_read": 24})  # prunes the step-1 checkpoint

    resumed = Learner(cfg, make_model())
    torch.manual_seed(999)  # disturbed on purpose: the checkpoint must restore it
    position = resumed.load_checkpoint(saved)
    draw_after_load = torch.rand(3)
    loaded_step = resumed.step_count
    for s in (2, 3):
        resumed.step(make_step(s))
    torch.save({"straight": straight, "resumed": _snapshot(resumed), "position": position,
                "loaded_step": loaded_step, "draws": (draw_after_save, draw_after_load), "saved": saved},
               os.path.join(out_dir, "result.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_resume_from_checkpoint_continues_exactly(zero_stage, tmp_path):
    run_ranks(_resume_main, 1, _free_port(), zero_stage, str(tmp_path))
    r = torch.load(tmp_path / "result.pt", weights_only=False)
    straight, resumed = r["straight"], r["resumed"]
    assert r["position"] == {"prompts_read": 12}
    assert r["loaded_step"] == 2
    assert resumed["step"] == straight["step"] == 4 and resumed["version"] == straight["version"] == 4
    assert resumed["lr"] == straight["lr"]
    assert torch.equal(r["draws"][0], r["draws"][1])
    assert sorted(resumed["params"]) == sorted(straight["params"])
    for name, value in straight["params"].items():
        assert torch.equal(resumed["params"][name], value), name
    assert len(resumed["optim"]) == len(straight["optim"]) > 0
    for a, b in zip(resumed["optim"], straight["optim"]):
        assert torch.equal(a, b)
    # keep_checkpoints = 2: the step-1 checkpoint was pruned
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]


def test_half_written_checkpoint_is_never_listed_or_loaded(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000003").mkdir(parents=True)
    (root / "step_00000003" / "complete.json").write_text('{"step": 3, "world_size": 1}\n')
    (root / ".tmp-step_00000007").mkdir()  # a crash mid-write: newer, but incomplete
    (root / ".tmp-step_00000007" / "complete.json").write_text('{"step": 7, "world_size": 1}\n')
    (root / "step_00000005").mkdir()  # renamed by hand without a marker: not complete either
    assert latest_complete(tmp_path) == root / "step_00000003"
    with pytest.raises(ValueError, match="is not complete"):
        load_checkpoint(object(), root / ".tmp-step_00000007")
    with pytest.raises(ValueError, match="is not complete"):
        load_checkpoint(object(), root / "step_00000005")
    assert latest_complete(tmp_path / "nowhere") is None
