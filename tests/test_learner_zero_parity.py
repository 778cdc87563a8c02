"""Two learner ranks under ZeRO-2 / ZeRO-3 take the same step as one plain-torch process.

The job has THREE ranks: 0-1 are the learner (DeepSpeed's whole world), rank 2 stands in for a
rollout worker that never calls into DeepSpeed and only meets the others at a final world barrier.
A DeepSpeed collective on the default group would hang rank 0-1 until the timeout, failing the test.

The step is split unevenly on purpose (one rank gets more micro-batches, the other an empty one), so
the parameters only match the single-process reference if the token-mean normaliser is the GLOBAL
token count of the step and the empty micro-batch keeps the collectives in step.
"""

import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from async_grpo.config import RunConfig
from async_grpo.learner.batching import assign_to_ranks, collate, pack_micro_batches
from async_grpo.learner.loss import grpo_loss
from async_grpo.learner.schedule import make_lr_lambda
from async_grpo.model.args import ModelArgs
from async_grpo.model.decoder import Decoder
from async_grpo.model.logprobs import token_logprobs
from async_grpo.transport.trajectory import Trajectory

ARGS = ModelArgs(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, architecture="llama")
STEPS = 2
BUDGET = 24  # padded tokens per micro-batch


def make_config(zero_stage: int, num_ranks: int) -> RunConfig:
    return RunConfig.model_validate({
        "learner": {"num_ranks": num_ranks, "zero_stage": zero_stage, "lr": 1e-2, "weight_decay": 0.1,
                    "warmup_steps": 2, "grad_clip": 0.5, "micro_batch_tokens": BUDGET, "device": "cpu",
                    "loss": {"correction": "tis", "is_cap": 1.5, "aggregation": "token_mean"}},
        "sampling": {"temperature": 1.0, "max_new_tokens": 8},
    })


def make_model() -> Decoder:
    model = Decoder(ARGS, device="cpu", dtype=torch.float32)
    model.init_weights(1234)
    return model


def make_step(step: int) -> list[Trajectory]:
    gen = torch.Generator().manual_seed(100 + step)
    # completion lengths chosen so the two ranks get different numbers of micro-batches
    shapes = [(3, 8), (2, 7), (4, 2), (2, 1), (3, 1), (2, 2)]
    out = []
    for i, (p, c) in enumerate(shapes):
        out.append(Trajectory(
            prompt_ids=torch.randint(1, 32, (p,), generator=gen, dtype=torch.int32),
            completion_ids=torch.randint(1, 32, (c,), generator=gen, dtype=torch.int32),
            behaviour_logprobs=-3.0 - torch.rand(c, generator=gen),
            reward=0.0, advantage=float(torch.randn((), generator=gen)), group_id=i // 2, sample_index=i % 2,
            policy_version=0, finish_reason="stop", worker_id=0,
        ))
    return out


def reference_params() -> dict[str, torch.Tensor]:
    """The same steps in one process: plain torch AdamW, the whole step as one batch."""
    cfg = make_config(2, 1)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(2, cfg.trainer.max_steps, "constant", 0.0))
    for step in range(STEPS):
        batch = collate(make_step(step))
        logp = token_logprobs(model(batch.input_ids), batch.targets)
        loss = grpo_loss(logp, batch.behaviour_logprobs, batch.advantages, batch.mask, cfg.learner.loss,
                         normalizer=float(batch.num_tokens)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        sched.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _rank_main(rank: int, world: int, port: int, zero_stage: int, out_dir: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))
    learner_group = dist.new_group([0, 1])
    if rank < 2:
        from async_grpo.learner.engine import Learner
        from async_grpo.learner.weight_export import export_hf, full_state_dict

        learner = Learner(make_config(zero_stage, 2), make_model(), learner_group)
        metrics = []
        for step in range(STEPS):
            trajs = make_step(step)
            share = [trajs[i] for i in assign_to_ranks(trajs, 2)[rank]]
            metrics.append(learner.step(share))
        state = full_state_dict(learner.engine, learner.group)
        export_hf(learner.engine, ARGS, os.path.join(out_dir, "hf"), learner.group)
        if rank == 0:
            torch.save({"params": state, "metrics": metrics}, os.path.join(out_dir, "result.pt"))
        else:
            assert state == {}, "non-zero ranks must yield nothing"
    dist.barrier()  # the world: rank 2 meets the learners only here
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, world: int, *args, timeout_s: float = 240) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, world, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} did not finish within {timeout_s}s"
    assert [p.exitcode for p in procs] == [0] * world, f"exit codes {[p.exitcode for p in procs]}"


def test_step_is_split_unevenly_across_the_two_learner_ranks():
    trajs = make_step(0)
    counts = [len(pack_micro_batches([trajs[i] for i in share], BUDGET)) for share in assign_to_ranks(trajs, 2)]
    assert counts[0] != counts[1], counts


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_rank_zero_step_matches_single_process_adamw(zero_stage, tmp_path):
    run_ranks(_rank_main, 3, _free_port(), zero_stage, str(tmp_path))
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    expected = reference_params()
    initial = dict(make_model().named_parameters())
    assert sorted(result["params"]) == sorted(expected)
    for name, want in expected.items():
        got = result["params"][name]
        assert got.shape == want.shape, name
        # the step moved the weights, and to the same place as the reference
        assert not torch.equal(got, initial[name].detach()), name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6, msg=name)
    m = result["metrics"]
    assert [x["step"] for x in m] == [1.0, 2.0]
    assert m[0]["tokens"] == 21.0 and m[0]["sequences"] == 6.0  # 8+7+2+1+1+2 completion tokens
    assert m[0]["lr"] == pytest.approx(0.5e-2) and m[1]["lr"] == pytest.approx(1e-2)  # warm-up over 2 steps
    assert all(math.isfinite(x["grad_norm"]) for x in m)

    # The exported checkpoint loads in transformers and gives the reference model's logits.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ours = make_model()
    ours.load_full_state_dict(expected)
    ids = torch.tensor([[3, 7, 1, 30, 12, 5], [9, 9, 2, 4, 0, 17]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-5)
