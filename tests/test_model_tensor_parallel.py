"""Tensor parallelism: two gloo ranks with tp_size 2 reproduce the tp_size 1 logits and weights."""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_model_support import ListPagedAttention

from async_grpo.model import Decoder, ModelArgs, load_pretrained, save_pretrained
from async_grpo.model.tensor_parallel import TPGroup

TIMEOUT_S = 120
# vocab 97 is odd: the vocabulary shards are ragged (49 + 48 rows).
ARGS = {
    "qwen2_tied": ModelArgs(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, attention_bias=True, architecture="qwen2",
                            tie_word_embeddings=True),
    "qwen3_untied": ModelArgs(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=16, qk_norm=True, architecture="qwen3",
                              attention_bias=True, attention_out_bias=True),
}
IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 84, 59, 0]])  # [B=2, S=8]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference_model(name: str) -> Decoder:
    model = Decoder(ARGS[name]).eval()
    model.init_weights(seed=11)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # every weight random, biases and norms included
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _paged_logits(model: Decoder) -> torch.Tensor:
    """Prefill both rows of IDS as one varlen batch, then one decode step; [4, V] last-token logits."""
    attn = ListPagedAttention(model.num_layers)
    attn.step([(0, 8), (1, 5)])
    ids = torch.cat([IDS[0], IDS[1, :5]])
    positions = torch.cat([torch.arange(8), torch.arange(5)])
    prefill = model.forward_paged(ids, positions, attn, torch.tensor([7, 12]))
    attn.step([(0, 1), (1, 1)])
    decode = model.forward_paged(torch.tensor([7, 59]), torch.tensor([8, 5]), attn)
    return torch.cat([prefill, decode])


def _tp_rank(rank: int, port: int, name: str, workdir: str) -> None:
    result: dict = {}
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
        group = dist.new_group([0, 1])
        full = torch.load(os.path.join(workdir, "full.pt"))
        model = Decoder(ARGS[name], tp_group=group).eval()
        model.load_full_state_dict(full)
        with torch.no_grad():
            result["forward"] = model(IDS)
            result["paged"] = _paged_logits(model)
        result["local_heads"] = (model.num_heads_local, model.num_kv_heads_local)
        result["q_proj_rows"] = model.model.layers[0].self_attn.q_proj.weight.shape[0]
        result["embed_rows"] = model.model.embed_tokens.weight.shape[0]
        gathered = model.full_state_dict()
        result["gathered_equal"] = sorted(n for n, t in gathered.items() if torch.equal(t, full[n]))
        save_pretrained(model, model.args, os.path.join(workdir, "saved"))
        try:
            Decoder(ARGS[name].replace(num_kv_heads=1), tp_group=group)
        except ValueError as e:
            result["kv_heads_error"] = str(e)
        dist.barrier(group)
        dist.destroy_process_group()
    except Exception:
        result["error"] = traceback.format_exc()
    torch.save(result, os.path.join(workdir, f"rank{rank}.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARGS))
def test_tp2_matches_tp1_for_forward_paged_and_weights(name, tmp_path):
    reference = _reference_model(name)
    full = {n: p.detach().clone() for n, p in reference.named_parameters()}
    torch.save(full, tmp_path / "full.pt")
    with torch.no_grad():
        expected_forward = reference(IDS)
        expected_paged = _paged_logits(reference)

    ctx = mp.start_processes(_tp_rank, args=(_free_port(), name, str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    # join() returns False while ranks still run; a hang becomes a failure after TIMEOUT_S.
    deadline = TIMEOUT_S
    while not ctx.join(timeout=5):
        deadline -= 5
        if deadline <= 0:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"tensor-parallel ranks did not finish within {TIMEOUT_S}s")

    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert "error" not in result, result.get("error")
        torch.testing.assert_close(result["forward"], expected_forward, atol=1e-5, rtol=0)
        torch.testing.assert_close(result["paged"], expected_paged, atol=1e-5, rtol=0)
        assert result["local_heads"] == (2, 1)
        assert result["q_proj_rows"] == 32
        assert result["embed_rows"] == [49, 48][rank]
        assert result["gathered_equal"] == sorted(full)
        assert result["kv_heads_error"] == "num_kv_heads = 1 is not divisible by tp_size = 2"

    saved = load_pretrained(tmp_path / "saved", torch.float32, "cpu")
    for n, p in saved.named_parameters():
        assert torch.equal(p, full[n]), n


def test_tp_size_one_layers_are_plain_and_vocab_ranges_cover_the_vocabulary():
    model = Decoder(ARGS["qwen2_tied"])
    assert model.tp.size == 1 and model.model.embed_tokens.weight.shape == (97, 64)
    ranges = [TPGroup(None, r, 3).vocab_range(97) for r in range(3)]
    assert ranges == [(0, 33), (33, 66), (66, 97)]
    with pytest.raises(ValueError, match="vocab_size = 2 is too small to split over tp_size = 3"):
        TPGroup(None, 2, 3).vocab_range(2)
