"""The KL term's frozen reference: equal to the policy at the start, apart after a step."""

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from test_learner_zero_parity import _free_port, make_config, make_model, make_step, run_ranks


def _kl_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))
    from async_grpo.learner.engine import Learner

    results = {}
    for zero_stage, placement in ((2, "cpu"), (3, "same")):
        cfg = make_config(zero_stage, 1)
        cfg.learner.loss.kl_beta = 0.5
        cfg.learner.loss.reference_device = placement
        learner = Learner(cfg, make_model())
        results[(zero_stage, placement)] = [learner.step(make_step(s)) for s in range(3)]
    torch.save(results, os.path.join(out_dir, "result.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_kl_to_reference_is_zero_at_start_and_grows_after_updates(tmp_path):
    run_ranks(_kl_main, 1, _free_port(), str(tmp_path))
    results = torch.load(tmp_path / "result.pt", weights_only=False)
    for key, metrics in results.items():
        assert metrics[0]["kl"] == 0.0, key  # reference == initial policy, k3(0) = 0 exactly
        assert metrics[1]["kl"] > 0.0 and metrics[2]["kl"] > 0.0, key
    # The reference's placement changes where it runs, not what it computes.
    cpu, sharded = results[(2, "cpu")], results[(3, "same")]
    for a, b in zip(cpu, sharded):
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-9)
