"""The learner's fast paths (fused lm_head + logprobs, compiled decoder layers) take the eager path's step."""

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from async_grpo.learner.engine import compile_enabled, fused_logprobs_enabled
from test_learner_zero_parity import _free_port, make_config, make_model, make_step, run_ranks

STEPS = 2


def _variants_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    from async_grpo.learner.engine import Learner, compile_decoder_layers

    results = {}
    for name in ("unfused", "fused", "fused_aot_eager", "fused_inductor"):
        cfg = make_config(2, 1)
        cfg.sampling.temperature = 0.7
        cfg.learner.fused_logprobs = name != "unfused"
        cfg.learner.compile = name == "fused_inductor"  # the config path: inductor's code, compiled on the CPU
        model = make_model()
        if name == "fused_aot_eager":
            # AOTAutograd without inductor's code generation: the graphs and gradient hooks alone.
            compile_decoder_layers(model, backend="aot_eager")
        learner = Learner(cfg, model)
        assert learner.fused_logprobs == (name != "unfused")
        assert learner.compiled == (name == "fused_inductor")
        compiled_layers = name in ("fused_aot_eager", "fused_inductor")
        assert all((layer._compiled_call_impl is not None) == compiled_layers for layer in learner.module.model.layers)
        metrics = [learner.step(make_step(s)) for s in range(STEPS)]
        params = {k: v.detach().clone() for k, v in learner.module.named_parameters()}
        results[name] = {"metrics": metrics, "params": params}
    torch.save(results, os.path.join(out_dir, "result.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fused_and_compiled_steps_match_the_unfused_eager_step(tmp_path):
    run_ranks(_variants_main, 1, _free_port(), str(tmp_path), timeout_s=300)
    results = torch.load(tmp_path / "result.pt", weights_only=False)
    base = results["unfused"]
    initial = dict(make_model().named_parameters())
    for name in ("fused", "fused_aot_eager", "fused_inductor"):
        got = results[name]
        assert sorted(got["params"]) == sorted(base["params"]), name
        for key, want in base["params"].items():
            assert not torch.equal(want, initial[key].detach()), key  # the steps moved every weight
            torch.testing.assert_close(got["params"][key], want, rtol=1e-4, atol=2e-6, msg=f"{name} {key}")
        for m_got, m_want in zip(got["metrics"], base["metrics"]):
            assert m_got["tokens"] == m_want["tokens"] == 21.0
            for key in ("loss", "entropy", "approx_kl", "grad_norm", "is_weight_mean"):
                assert m_got[key] == pytest.approx(m_want[key], rel=1e-4, abs=1e-6), f"{name} {key}"


def test_fused_logprobs_auto_is_on_under_zero_1_and_2_only():
    model = make_model()
    assert fused_logprobs_enabled("auto", 1, model) and fused_logprobs_enabled("auto", 2, model)
    assert not fused_logprobs_enabled("auto", 3, model)
    assert not fused_logprobs_enabled(False, 2, model)
    with pytest.raises(ValueError, match="learner.fused_logprobs = true with learner.zero_stage = 3"):
        fused_logprobs_enabled(True, 3, model)


def test_compile_auto_is_off_on_cpu_and_true_is_refused_under_zero_3():
    assert not compile_enabled("auto", torch.device("cpu"), 2)
    assert compile_enabled("auto", torch.device("cuda", 0), 2)
    assert not compile_enabled("auto", torch.device("cuda", 0), 3)
    assert compile_enabled(True, torch.device("cpu"), 1)
    with pytest.raises(ValueError, match="learner.compile = true with learner.zero_stage = 3"):
        compile_enabled(True, torch.device("cuda", 0), 3)


def _cuda_variants_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(LOCAL_RANK="0", OMP_NUM_THREADS="1")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=240))
    from async_grpo.learner.engine import Learner

    results = {}
    for fused, compiled in ((False, False), (True, True)):
        cfg = make_config(2, 1)
        cfg.learner.device = "cuda"
        cfg.learner.optimizer = "torch_adamw"  # no FusedAdam build inside a test
        cfg.sampling.temperature = 0.7
        cfg.learner.fused_logprobs, cfg.learner.compile = fused, compiled
        cfg.learner.loss.kl_beta = 0.5  # a reference on the GPU: compiled with the policy when it is
        learner = Learner(cfg, make_model())
        reference_layers = learner.reference.module.model.layers
        assert all((layer._compiled_call_impl is not None) == compiled for layer in reference_layers)
        results[(fused, compiled)] = [learner.step(make_step(s)) for s in range(STEPS)]
    torch.save(results, os.path.join(out_dir, "result.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 ZeRO-2 with inductor-compiled layers needs CUDA")
def test_fused_compiled_cuda_step_matches_the_eager_step_in_bf16(tmp_path):
    run_ranks(_cuda_variants_main, 1, _free_port(), str(tmp_path), timeout_s=400)
    results = torch.load(tmp_path / "result.pt", weights_only=False)
    eager, fast = results[(False, False)], results[(True, True)]
    # The first step starts from the same weights: the loss and its metrics agree to bf16 precision.
    for key in ("loss", "entropy", "approx_kl", "is_weight_mean"):
        assert fast[0][key] == pytest.approx(eager[0][key], rel=2e-2, abs=1e-3), key
    assert fast[0]["grad_norm"] == pytest.approx(eager[0]["grad_norm"], rel=5e-2)
    # The reference starts as the policy: KL ~0 (the compiled reference's inference graph may round
    # differently from the policy's training graph), then both see the same update.
    assert eager[0]["kl"] == 0.0 and abs(fast[0]["kl"]) < 1e-3
    assert fast[1]["kl"] == pytest.approx(eager[1]["kl"], rel=0.1, abs=1e-4) and eager[1]["kl"] > 0
    assert fast[0]["tokens"] == eager[0]["tokens"] == 21.0
