"""The multi-tensor overflow check and gradient norm give DeepSpeed's own answers, and its steps.

Two gloo learner ranks under ZeRO-1 and ZeRO-2 train the same steps with `learner.fused_grad_checks`
on and off: identical gradient norms (DeepSpeed's all_reduce over the ranks included) and parameters.
A third step gets a NaN gradient on one rank only: both variants skip it on both ranks, so the
parameters stay exactly as the second step left them. On one rank the two replacements are also
compared directly with DeepSpeed's per-tensor methods on hand-made gradients (NaN, +inf, -inf,
a finite value whose square overflows fp32, where only the overflow answer differs).
"""

import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from test_learner_zero_parity import _free_port, make_config, make_model, make_step, run_ranks

STEPS = 3  # the last one has a NaN gradient


def _variants_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    from async_grpo.learner.engine import Learner

    results = {}
    for zero_stage in (1, 2):
        for fused in (False, True):
            cfg = make_config(zero_stage, world)
            cfg.learner.fused_grad_checks = fused
            learner = Learner(cfg, make_model())
            assert learner.fused_grad_checks == fused
            metrics, snapshots = [], []
            for step in range(STEPS):
                handle = None
                if step == STEPS - 1 and rank == 1:
                    # One rank's gradient turns NaN: the overflow is a collective decision.
                    weight = learner.module.model.layers[0].mlp.up_proj.weight
                    handle = weight.register_hook(lambda grad: grad * float("nan"))
                mine = make_step(step)[rank::world]
                metrics.append(learner.step(mine))
                if handle is not None:
                    handle.remove()
                snapshots.append({k: v.detach().clone() for k, v in learner.module.named_parameters()})
            results[(zero_stage, fused)] = {"metrics": metrics, "snapshots": snapshots}
    torch.save(results, os.path.join(out_dir, f"result{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fused_checks_take_deepspeeds_steps_and_skip_a_nan_step_on_every_rank(tmp_path):
    run_ranks(_variants_main, 2, _free_port(), str(tmp_path), timeout_s=300)
    for rank in range(2):
        results = torch.load(tmp_path / f"result{rank}.pt", weights_only=False)
        for zero_stage in (1, 2):
            plain, fused = results[(zero_stage, False)], results[(zero_stage, True)]
            for step in range(STEPS - 1):
                want, got = plain["metrics"][step]["grad_norm"], fused["metrics"][step]["grad_norm"]
                assert math.isfinite(want) and want > 0.5  # above grad_clip: the clipping path runs
                assert got == pytest.approx(want, rel=1e-6), (zero_stage, step)
                for key, value in plain["snapshots"][step].items():
                    torch.testing.assert_close(fused["snapshots"][step][key], value, rtol=1e-6, atol=1e-7,
                                               msg=f"ZeRO-{zero_stage} step {step} {key}")
            for variant in (plain, fused):
                # The NaN step was skipped: no parameter moved, and the norm reads non-finite.
                assert not math.isfinite(variant["metrics"][-1]["grad_norm"])
                for key, value in variant["snapshots"][-2].items():
                    assert torch.equal(variant["snapshots"][-1][key], value), (zero_stage, key)


def _direct_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from async_grpo.learner.engine import Learner

    learner = Learner(make_config(2, 1), make_model())
    opt = learner.optimizer
    assert learner.fused_grad_checks
    params = list(opt.params_in_partition[0])
    shapes = [p.shape for p in params]
    gen = torch.Generator().manual_seed(7)
    finite = [torch.randn(s, generator=gen) for s in shapes]
    out = {}
    for case, poison in (("finite", None), ("nan", float("nan")), ("inf", float("inf")),
                         ("-inf", float("-inf")), ("huge", 1e20)):
        grads = [g.clone() for g in finite]
        if poison is not None:
            grads[len(grads) // 2].view(-1)[3] = poison
        saved = opt.averaged_gradients
        opt.averaged_gradients = {0: grads}
        try:
            overflow = (bool(opt.has_overflow_partitioned_grads_serial()),
                        bool(DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial(opt)))
        finally:
            opt.averaged_gradients = saved
        norms = (float(opt.get_grad_norm_direct(grads, params)),
                 float(DeepSpeedZeroOptimizer.get_grad_norm_direct(opt, grads, params)))
        out[case] = {"overflow": overflow, "norm": norms}
    torch.save(out, os.path.join(out_dir, "direct.pt"))
    dist.destroy_process_group()


def test_fused_checks_answer_as_deepspeeds_per_tensor_loops(tmp_path):
    run_ranks(_direct_main, 1, _free_port(), str(tmp_path), timeout_s=240)
    out = torch.load(tmp_path / "direct.pt", weights_only=False)
    for case in ("finite", "nan", "inf", "-inf"):
        want = case != "finite"
        assert out[case]["overflow"] == (want, want), case
    fused, deepspeed = out["finite"]["norm"]
    assert fused == pytest.approx(deepspeed, rel=1e-6) and fused > 1.0
    # 1e20 is finite: DeepSpeed's element check passes it, the fp32 norm check does not. Its squared
    # norm overflows fp32 in both norms, so both read non-finite (-1) and DeepSpeed skips the step with
    # either check: the same outcome.
    assert out["huge"]["overflow"] == (True, False)
    assert out["huge"]["norm"] == (-1.0, -1.0)
    for case in ("nan", "inf", "-inf"):
        assert out[case]["norm"] == (-1.0, -1.0), case  # DeepSpeed's sentinel for a non-finite norm
