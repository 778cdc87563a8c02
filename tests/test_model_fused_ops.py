"""Fused generation ops: each Triton kernel against its torch reference, and the fused forward_paged
(fused q|k|v and gate|up GEMMs) against the eager one, alone, in the engine, after weight loads and
under tensor parallelism.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1). The interpreter
casts fp32 to bf16 by truncation where a GPU rounds to nearest, so there the bf16 comparisons allow a
few bf16 ulps; on a GPU the same tests hold them to about one.
"""

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

pytest.importorskip("triton")

from async_grpo.config import KVConfig, ModelConfig, SamplingConfig  # noqa: E402
from async_grpo.model import Decoder, ModelArgs, build_model  # noqa: E402
from async_grpo.model.fused_ops import (  # noqa: E402
    add_rms_norm,
    add_rms_norm_reference,
    rope_qk,
    rope_qk_reference,
    silu_and_mul,
    silu_and_mul_reference,
)
from async_grpo.model.rope import RotaryEmbedding  # noqa: E402
from async_grpo.workers.engine import GenerationEngine  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
TIMEOUT_S = 120
# (rtol, atol): fp32 to rounding; bf16 to one ulp (2^-7 relative) compiled, a few under the truncating interpreter.
TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (2**-7, 2**-7) if ON_GPU else (3 * 2**-7, 3 * 2**-7)}
DTYPES = [torch.float32, torch.bfloat16]

ARGS = {
    "llama": ModelArgs(vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2_bias": ModelArgs(vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, attention_bias=True, architecture="qwen2",
                            tie_word_embeddings=True),
    "qwen3_qk_norm": ModelArgs(vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                               num_kv_heads=1, head_dim=32, qk_norm=True, architecture="qwen3",
                               attention_bias=True, attention_out_bias=True),
}
# Tensor parallelism over 2 ranks needs kv heads that split evenly.
TP_ARGS = {"qwen3_tp2": ARGS["qwen3_qk_norm"].replace(num_kv_heads=2)}
ALL_ARGS = ARGS | TP_ARGS


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0,
           centre: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (centre + scale * torch.randn(*shape, generator=gen)).to(DEVICE, dtype)


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    rtol, atol = TOL[want.dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def _random_model(name: str, seed: int = 3, tp_group=None) -> Decoder:
    """Every weight random (norms, biases too), so a mis-fused piece changes the output."""
    model = Decoder(ALL_ARGS[name], tp_group=tp_group, device=DEVICE).eval()
    model.load_full_state_dict(_random_state(name, seed))
    return model


def _random_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    ref = Decoder(ALL_ARGS[name]).eval()
    ref.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return ref.full_state_dict()


# ---- kernels against their references -----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_kernel_matches_reference_and_returns_the_sum(dtype):
    x, res = _randn(5, 48, seed=1, dtype=dtype), _randn(5, 48, seed=2, dtype=dtype)
    weight = _randn(48, seed=3, dtype=dtype, scale=0.1, centre=1.0)
    normed, new_res = add_rms_norm(x, res, weight, 1e-6, use_triton=True)
    want_normed, want_res = add_rms_norm_reference(x, res, weight, 1e-6)
    _assert_close(normed, want_normed)
    _assert_close(new_res, want_res)
    if dtype == torch.float32:  # one fp32 add: bit-exact
        assert torch.equal(new_res, x + res)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_kernel_without_residual_matches_reference(dtype):
    x = _randn(3, 40, seed=4, dtype=dtype, scale=3.0)  # 40: a row narrower than its power-of-two block
    weight = _randn(40, seed=5, dtype=dtype, scale=0.1, centre=1.0)
    normed, passed = add_rms_norm(x, None, weight, 1e-5, use_triton=True)
    _assert_close(normed, add_rms_norm_reference(x, None, weight, 1e-5)[0])
    assert passed is x


def test_rms_norm_kernel_hand_computed_row():
    x = torch.tensor([[3.0, 4.0]], device=DEVICE)  # mean square 12.5
    weight = torch.tensor([2.0, 0.5], device=DEVICE)
    normed, _ = add_rms_norm(x, None, weight, 0.0, use_triton=True)
    rms = 12.5 ** 0.5
    torch.testing.assert_close(normed, torch.tensor([[2 * 3 / rms, 0.5 * 4 / rms]], device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_kernel_matches_reference(dtype):
    gate_up = _randn(4, 2 * 1100, seed=6, dtype=dtype, scale=2.0)  # I = 1100: two column blocks, the last partial
    got = silu_and_mul(gate_up, use_triton=True)
    assert got.shape == (4, 1100)
    _assert_close(got, silu_and_mul_reference(gate_up))


def test_silu_and_mul_kernel_hand_computed_values():
    gate_up = torch.tensor([[0.0, 2.0, 5.0, 3.0]], device=DEVICE)  # gate [0, 2], up [5, 3]
    silu2 = 2.0 / (1.0 + torch.exp(torch.tensor(-2.0))).item()
    torch.testing.assert_close(silu_and_mul(gate_up, use_triton=True), torch.tensor([[0.0, 3 * silu2]], device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_qk_kernel_matches_reference(dtype, qk_norm):
    hq, hkv, d = 6, 2, 16  # 8 heads in one tile, none of them padding; 6 q heads: not a power of two
    args = ARGS["llama"].replace(num_heads=hq, num_kv_heads=hkv, head_dim=d, rope_theta=500.0)
    cos, sin = RotaryEmbedding(args, DEVICE).cos_sin(torch.tensor([0, 1, 7, 300, 2], device=DEVICE), dtype)
    qkv = _randn(5, (hq + 2 * hkv) * d, seed=7, dtype=dtype)
    norms = {}
    if qk_norm:
        norms = dict(q_norm_weight=_randn(d, seed=8, dtype=dtype, scale=0.1, centre=1.0),
                     k_norm_weight=_randn(d, seed=9, dtype=dtype, scale=0.1, centre=1.0))
    q, k, v = rope_qk(qkv, cos, sin, hq, hkv, d, eps=1e-6, use_triton=True, **norms)
    want_q, want_k, want_v = rope_qk_reference(qkv, cos, sin, hq, hkv, d, eps=1e-6, **norms)
    assert q.shape == (5, hq, d) and k.shape == (5, hkv, d) and v.shape == (5, hkv, d)
    _assert_close(q, want_q)
    _assert_close(k, want_k)
    assert torch.equal(v, want_v)


def test_rope_qk_kernel_rotates_a_hand_computed_head():
    # One q head and one kv head of dim 2, position p: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
    args = ARGS["llama"].replace(num_heads=1, num_kv_heads=1, head_dim=2, rope_scaling=None, rope_theta=10000.0)
    cos, sin = RotaryEmbedding(args, DEVICE).cos_sin(torch.tensor([3], device=DEVICE), torch.float32)
    qkv = torch.tensor([[1.0, 2.0, -1.0, 0.5, 9.0, 8.0]], device=DEVICE)  # q (1, 2), k (-1, 0.5), v (9, 8)
    q, k, v = rope_qk(qkv, cos, sin, 1, 1, 2, use_triton=True)
    c, s = torch.cos(torch.tensor(3.0)).item(), torch.sin(torch.tensor(3.0)).item()
    torch.testing.assert_close(q[0, 0], torch.tensor([1 * c - 2 * s, 2 * c + 1 * s], device=DEVICE))
    torch.testing.assert_close(k[0, 0], torch.tensor([-1 * c - 0.5 * s, 0.5 * c - 1 * s], device=DEVICE))
    assert v[0, 0].tolist() == [9.0, 8.0]


def test_fused_ops_reject_bad_shapes_with_the_expected_ones():
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight \(7,\) torch.float32: expected \[8\] torch.float32"):
        add_rms_norm(x, None, torch.ones(7, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="gate_up has 7 columns: expected an even number"):
        silu_and_mul(torch.zeros(2, 7, device=DEVICE))
    cos = torch.zeros(2, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"qkv has 20 columns: expected .* = 24"):
        rope_qk(torch.zeros(2, 20, device=DEVICE), cos, cos, 4, 1, 4)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU fallback")
def test_use_triton_true_off_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="use_triton=True but tensors are on 'cpu'"):
        add_rms_norm(x, None, torch.ones(8), 1e-6, use_triton=True)
    # Left to choose, plain CPU runs the reference.
    assert torch.equal(silu_and_mul(torch.ones(2, 4)), silu_and_mul_reference(torch.ones(2, 4)))


# ---- the fused forward_paged ------------------------------------------------------------------------


def _prefill_then_decode(model: Decoder, fused: bool) -> torch.Tensor:
    """Two sequences prefilled as one varlen batch, then two decode steps; logits of every step [6, V]."""
    attn = ListPagedAttention(model.num_layers)
    attn.step([(0, 6), (1, 3)])
    ids, positions = torch.tensor([4, 8, 15, 16, 23, 42, 7, 3, 30]), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2])
    out = [model.forward_paged(ids.to(DEVICE), positions.to(DEVICE), attn, torch.tensor([5, 8], device=DEVICE),
                               fused_ops=fused)]
    for step, tokens in enumerate(([50, 12], [1, 60])):
        attn.step([(0, 1), (1, 1)])
        pos = torch.tensor([6 + step, 3 + step], device=DEVICE)
        out.append(model.forward_paged(torch.tensor(tokens, device=DEVICE), pos, attn, fused_ops=fused))
    return torch.cat(out)  # [6, V]


@pytest.mark.parametrize("name", sorted(ARGS))
@torch.no_grad()
def test_fused_forward_paged_equals_eager(name):
    model = _random_model(name)
    eager = _prefill_then_decode(model, fused=False)
    fused = _prefill_then_decode(model, fused=True)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    assert fused.argmax(-1).tolist() == eager.argmax(-1).tolist()


@pytest.mark.parametrize("name", ["qwen2_bias"])
@torch.no_grad()
def test_fused_forward_paged_bf16_stays_near_eager(name):
    model = _random_model(name).to(torch.bfloat16)
    eager = _prefill_then_decode(model, fused=False).float()
    fused = _prefill_then_decode(model, fused=True).float()
    # Logits of a 2-layer bf16 model: bf16 rounding differences stay well below the logit spread.
    assert (fused - eager).abs().max().item() < 0.05 * eager.abs().max().item()


@torch.no_grad()
def test_fused_path_keeps_hf_names_and_the_training_forward():
    model = _random_model("qwen2_bias")
    names_before = sorted(model.state_dict())
    dense_before = model(torch.tensor([[1, 2, 3, 4]], device=DEVICE))
    model.prepare_fused_decode()
    assert sorted(model.state_dict()) == names_before
    assert sorted(n for n, _ in model.named_parameters()) == sorted(n for n, _ in Decoder(ARGS["qwen2_bias"])
                                                                    .named_parameters())
    assert torch.equal(model(torch.tensor([[1, 2, 3, 4]], device=DEVICE)), dense_before)


@pytest.mark.parametrize("name", ["qwen2_bias", "qwen3_qk_norm"])
@torch.no_grad()
def test_weights_loaded_after_fusing_are_used_in_place(name):
    model = _random_model(name, seed=3)
    model.prepare_fused_decode()
    fused_buffers = [(w.qkv_weight, w.gate_up_weight) for w in model._fused_decode.layers]
    before = _prefill_then_decode(model, fused=True)
    new_state = _random_state(name, seed=4)
    # One tensor at a time, as checkpoint loading and broadcast buckets deliver them.
    for key, tensor in new_state.items():
        model.load_full_state_dict({key: tensor}, strict=False)
    after = _prefill_then_decode(model, fused=True)
    fresh = _prefill_then_decode(_random_model(name, seed=4), fused=False)
    assert (after - before).abs().max().item() > 1e-2  # the new weights really changed the output
    torch.testing.assert_close(after, fresh, rtol=1e-5, atol=1e-5)
    # Same storage as before the load: graphs captured against the buffers stay valid.
    now = [(w.qkv_weight.data_ptr(), w.gate_up_weight.data_ptr()) for w in model._fused_decode.layers]
    assert now == [(qkv.data_ptr(), gate_up.data_ptr()) for qkv, gate_up in fused_buffers]
    # A second engine preparing the same model refreshes the copies in place rather than replacing them.
    model.prepare_fused_decode()
    again = [(w.qkv_weight.data_ptr(), w.gate_up_weight.data_ptr()) for w in model._fused_decode.layers]
    assert again == now


@torch.no_grad()
def test_moving_the_model_after_fusing_is_a_clear_error():
    model = _random_model("llama")
    model.prepare_fused_decode()
    model.to(torch.float64)
    attn = ListPagedAttention(model.num_layers)
    attn.step([(0, 2)])
    with pytest.raises(RuntimeError, match="call model.prepare_fused_decode\\(\\) again"):
        model.forward_paged(torch.tensor([1, 2], device=DEVICE), torch.arange(2, device=DEVICE), attn, fused_ops=True)


# ---- the engine ---------------------------------------------------------------------------------------


def _tokens(results):
    return [[c.token_ids for c in g] for g in results]


@torch.no_grad()
def test_engine_greedy_tokens_with_fused_ops_equal_without():
    model = build_model(ModelConfig(preset="tiny", init_seed=3), DEVICE, torch.float32).eval()
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3, 2]]
    params = SamplingConfig(temperature=0, max_new_tokens=5, ignore_eos=True)
    kv = KVConfig(block_size=4, num_blocks=32, attention="triton")
    plain = GenerationEngine(model, kv, DEVICE, torch.float32)
    fused = GenerationEngine(model, kv.model_copy(update={"fused_decode_ops": True}), DEVICE, torch.float32)
    expected = plain.generate(prompts, 2, params)
    got = fused.generate(prompts, 2, params)
    assert _tokens(got) == _tokens(expected)
    assert fused.last_stats.decode_steps == plain.last_stats.decode_steps > 0
    for g_got, g_exp in zip(got, expected):
        for a, b in zip(g_got, g_exp):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


class NewWeightsAfter:
    """A DecodeControl that loads `state` (as version 1) after `steps` decode-loop polls."""

    def __init__(self, model, state, steps):
        self.model, self.state, self.steps, self.polls = model, state, steps, 0

    def poll_new_weights(self) -> bool:
        self.polls += 1
        return self.polls == self.steps + 1

    def on_new_weights(self) -> int:
        self.model.load_full_state_dict(self.state)
        return 1


@torch.no_grad()
def test_engine_with_fused_ops_follows_a_weight_update_mid_generation():
    new_state = build_model(ModelConfig(preset="tiny", init_seed=5), "cpu", torch.float32).full_state_dict()
    prompts, params = [[3, 14, 15, 9, 2], [6, 5, 35]], SamplingConfig(temperature=0, max_new_tokens=6, ignore_eos=True)
    results = {}
    for fused in (False, True):
        model = build_model(ModelConfig(preset="tiny", init_seed=3), DEVICE, torch.float32).eval()
        kv = KVConfig(block_size=4, num_blocks=32, attention="triton", fused_decode_ops=fused)
        engine = GenerationEngine(model, kv, DEVICE, torch.float32)
        results[fused] = _tokens(engine.generate(prompts, 2, params, control=NewWeightsAfter(model, new_state, 3)))
        assert engine.last_stats.weight_updates == 1
    assert results[True] == results[False]
    # The update changed the continuation (compared with a run that never gets new weights).
    model = build_model(ModelConfig(preset="tiny", init_seed=3), DEVICE, torch.float32).eval()
    kv = KVConfig(block_size=4, num_blocks=32, attention="triton", fused_decode_ops=True)
    assert _tokens(GenerationEngine(model, kv, DEVICE, torch.float32).generate(prompts, 2, params)) != results[True]


# ---- tensor parallelism ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_rank(rank: int, port: int, name: str, workdir: str) -> None:
    result: dict = {}
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
        group = dist.new_group([0, 1])
        model = Decoder(ALL_ARGS[name], tp_group=group).eval()
        model.load_full_state_dict(torch.load(os.path.join(workdir, "full.pt")))
        with torch.no_grad():
            result["fused"] = _prefill_then_decode(model, fused=True)
        result["qkv_rows"] = model._fused_decode.layers[0].qkv_weight.shape[0]
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the parent test
        result["error"] = traceback.format_exc()
    torch.save(result, os.path.join(workdir, f"rank{rank}.pt"))


@pytest.mark.skipif(ON_GPU, reason="CPU gloo ranks (the kernels run in the interpreter)")
@pytest.mark.parametrize("name", sorted(TP_ARGS))
def test_fused_forward_paged_under_tensor_parallelism_matches_one_rank(tmp_path, name):
    ref = _random_model(name)
    torch.save(ref.full_state_dict(), tmp_path / "full.pt")
    with torch.no_grad():
        want = _prefill_then_decode(ref, fused=False)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_tp_rank, args=(r, port, name, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail(f"tensor-parallel rank did not finish within {TIMEOUT_S} s")
    args = ALL_ARGS[name]
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert "error" not in result, result.get("error")
        # Each rank fuses its own shard: half the q heads and half the kv heads.
        assert result["qkv_rows"] == (args.num_heads + 2 * args.num_kv_heads) * args.head_dim // 2
        torch.testing.assert_close(result["fused"], want, rtol=1e-5, atol=1e-5)
