"""Fused lm_head + token logprobs at masked rows: equal to the unfused path in value and gradient."""

from __future__ import annotations

import pytest
import torch

from async_grpo.model.args import ModelArgs
from async_grpo.model.decoder import Decoder
from async_grpo.model.fused_logprobs import chunk_rows_for, masked_token_logprobs
from async_grpo.model.logprobs import token_entropy, token_logprobs

B, S, H, V = 3, 5, 6, 11


def _inputs(dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=gen, dtype=dtype).requires_grad_()
    weight = (2 * torch.randn(V, H, generator=gen, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, V, (B, S), generator=gen)
    # 8 masked rows out of 15, spread over every row of the batch
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    loss_weights = torch.randn(B, S, generator=gen, dtype=dtype)
    return hidden, weight, targets, mask, loss_weights


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])  # 3 does not divide the 8 masked rows
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp64_values_and_gradients_equal_dense_autograd(chunk_rows, temperature):
    hidden, weight, targets, mask, loss_weights = _inputs(torch.float64)
    lp, ent = masked_token_logprobs(hidden, weight, targets, mask, temperature, chunk_rows)
    grad_h, grad_w = torch.autograd.grad((lp * loss_weights).sum(), (hidden, weight))

    logp_all = torch.log_softmax(hidden @ weight.t() / temperature, dim=-1)  # [B, S, V]
    ref_lp = torch.where(mask, logp_all.gather(-1, targets[..., None]).squeeze(-1), 0.0)
    ref_ent = torch.where(mask, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    ref_grad_h, ref_grad_w = torch.autograd.grad((ref_lp * loss_weights).sum(), (hidden, weight))

    assert lp.dtype == torch.float64 and lp.shape == (B, S)
    assert not ent.requires_grad
    torch.testing.assert_close(lp, ref_lp, atol=1e-12, rtol=0)
    torch.testing.assert_close(ent, ref_ent.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_h, ref_grad_h, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_w, ref_grad_w, atol=1e-12, rtol=0)
    # rows off the mask get exactly zero, and no gradient flows into their hidden states
    assert lp[~mask].eq(0).all() and ent[~mask].eq(0).all()
    assert grad_h[~mask].eq(0).all()


def test_fp32_matches_the_unfused_logits_path_at_temperature():
    hidden, weight, targets, mask, loss_weights = _inputs(torch.float32, seed=3)
    lp, ent = masked_token_logprobs(hidden, weight, targets, mask, temperature=0.6, chunk_rows=3)
    grads = torch.autograd.grad((lp * loss_weights).sum(), (hidden, weight))

    logits = hidden @ weight.t()  # [B, S, V]
    ref_lp = token_logprobs(logits, targets, 0.6) * mask
    ref_ent = token_entropy(logits.detach(), 0.6) * mask
    ref_grads = torch.autograd.grad((ref_lp * loss_weights).sum(), (hidden, weight))
    torch.testing.assert_close(lp, ref_lp, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(ent, ref_ent, atol=2e-6, rtol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_decoder_hidden_path_gives_every_parameter_the_unfused_gradient(tied):
    args = ModelArgs(vocab_size=37, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=4, architecture="qwen2", attention_bias=True, tie_word_embeddings=tied)
    model = Decoder(args, device="cpu", dtype=torch.float32)
    model.init_weights(7)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 37, (2, 9), generator=gen)
    targets = torch.randint(0, 37, (2, 9), generator=gen)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 3:9], mask[1, 2:5] = True, True
    adv = torch.tensor([[1.5], [-0.5]])

    hidden = model(ids, hidden_only=True)  # [2, 9, 16]
    assert hidden.shape == (2, 9, 16)
    lp, _ = masked_token_logprobs(hidden, model.lm_head.weight, targets, mask, temperature=0.8, chunk_rows=4)
    fused = torch.autograd.grad((lp * adv).sum(), list(model.parameters()))
    ref_lp = token_logprobs(model(ids), targets, 0.8) * mask
    unfused = torch.autograd.grad((ref_lp * adv).sum(), list(model.parameters()))

    torch.testing.assert_close(lp, ref_lp, atol=2e-6, rtol=1e-6)
    names = [n for n, _ in model.named_parameters()]
    assert ("lm_head.weight" in names) != tied  # tied: one Parameter, listed under the embedding
    for name, got, want in zip(names, fused, unfused):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)


def test_empty_mask_gives_zeros_and_a_zero_weight_gradient():
    hidden, weight, targets, _, _ = _inputs(torch.float32)
    lp, ent = masked_token_logprobs(hidden, weight, targets, torch.zeros(B, S, dtype=torch.bool))
    assert lp.eq(0).all() and ent.eq(0).all()
    grad_h, grad_w = torch.autograd.grad(lp.sum(), (hidden, weight))
    # a tensor, not None: ZeRO's per-parameter gradient hooks must fire on an empty micro-batch too
    assert grad_w is not None and grad_w.eq(0).all() and grad_h.eq(0).all()


def test_bf16_hidden_gives_fp32_logprobs_and_bf16_gradients():
    hidden, weight, targets, mask, _ = _inputs(torch.float32, seed=5)
    h16 = hidden.detach().bfloat16().requires_grad_()
    w16 = weight.detach().bfloat16().requires_grad_()
    lp, ent = masked_token_logprobs(h16, w16, targets, mask, chunk_rows=2)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    ref = torch.log_softmax((h16 @ w16.t()).float(), -1).gather(-1, targets[..., None]).squeeze(-1) * mask
    torch.testing.assert_close(lp, ref.detach(), atol=1e-6, rtol=0)
    lp.sum().backward()
    assert h16.grad.dtype == torch.bfloat16 and w16.grad.dtype == torch.bfloat16


def test_chunk_rows_follow_the_memory_budget():
    assert chunk_rows_for(151_936) == 1766  # 2**30 // (4 * 151936)
    assert chunk_rows_for(1000, chunk_mb=1) == 262  # 2**20 // 4000
    assert chunk_rows_for(10**9, chunk_mb=1) == 1


def test_bad_inputs_are_named():
    hidden, weight, targets, mask, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"lm_head weight has shape \(11, 5\): expected \[V, 6\]"):
        masked_token_logprobs(hidden, weight[:, :5], targets, mask)
    with pytest.raises(ValueError, match=r"expected both \(3, 5\)"):
        masked_token_logprobs(hidden, weight, targets[:, :4], mask)
    with pytest.raises(ValueError, match="mask is torch.int64: expected torch.bool"):
        masked_token_logprobs(hidden, weight, targets, mask.long())
    with pytest.raises(ValueError, match="temperature = 0"):
        masked_token_logprobs(hidden, weight, targets, mask, temperature=0)
    with pytest.raises(ValueError, match="chunk_rows = 0"):
        masked_token_logprobs(hidden, weight, targets, mask, chunk_rows=0)
    with pytest.raises(ValueError, match="lm_head weight is torch.float64 but hidden is torch.float32"):
        masked_token_logprobs(hidden, weight.double(), targets, mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor-compiled chunk kernels are the CUDA path")
def test_compiled_chunk_kernels_match_eager_on_cuda_bf16():
    from async_grpo.model.fused_logprobs import ChunkKernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(4, 300, 64, device="cuda", generator=gen).bfloat16()
    weight = (0.2 * torch.randn(5003, 64, device="cuda", generator=gen)).bfloat16()
    targets = torch.randint(0, 5003, (4, 300), device="cuda", generator=gen)
    mask = torch.rand(4, 300, device="cuda", generator=gen) < 0.7
    outs = []
    for kernels in (ChunkKernels(compiled=False), ChunkKernels(compiled=True)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = masked_token_logprobs(h, w, targets, mask, 0.9, chunk_rows=257, kernels=kernels)
        lp.sum().backward()
        outs.append((lp, ent, h.grad.float(), w.grad.float()))
    for eager, compiled in zip(*outs):
        torch.testing.assert_close(compiled, eager, atol=2e-3, rtol=2e-2)
