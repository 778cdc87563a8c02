"""`forward_paged` (flattened varlen tokens through the PagedAttention seam) agrees with dense `forward`."""

from __future__ import annotations

import pytest
import torch
from test_model_support import ListPagedAttention

from async_grpo.model import Decoder, ModelArgs

ARGS = {
    "llama_gqa": ModelArgs(vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=16, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen3_qk_norm": ModelArgs(vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                               num_kv_heads=1, head_dim=32, qk_norm=True, architecture="qwen3",
                               tie_word_embeddings=True),
}


def _model(name: str) -> Decoder:
    model = Decoder(ARGS[name]).eval()
    model.init_weights(seed=3)
    with torch.no_grad():  # random norms too, so q/k norm weights matter
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    return model


def _dense_last_logits(model: Decoder, seq: list[int]) -> torch.Tensor:
    return model(torch.tensor([seq]))[0, -1]  # [V]


@pytest.mark.parametrize("name", sorted(ARGS))
@torch.no_grad()
def test_single_sequence_prefill_and_decode_match_dense(name):
    model = _model(name)
    seq = [5, 9, 1, 33, 7, 2, 60]
    attn = ListPagedAttention(model.num_layers)
    attn.step([(0, len(seq))])
    logits = model.forward_paged(torch.tensor(seq), torch.arange(len(seq)), attn, torch.tensor([len(seq) - 1]))
    assert logits.shape == (1, 61)
    torch.testing.assert_close(logits[0], _dense_last_logits(model, seq), atol=1e-5, rtol=0)
    for step, token in enumerate([11, 42, 0]):
        seq.append(token)
        attn.step([(0, 1)])
        logits = model.forward_paged(torch.tensor([token]), torch.tensor([len(seq) - 1]), attn)
        torch.testing.assert_close(logits[0], _dense_last_logits(model, seq), atol=1e-5, rtol=0)
    assert [t[0].shape[0] for t in attn.cache[0]] == [len(seq)] * model.num_layers


@pytest.mark.parametrize("name", sorted(ARGS))
@torch.no_grad()
def test_two_sequence_varlen_batch_matches_dense_per_sequence(name):
    model = _model(name)
    seqs = [[4, 8, 15, 16, 23, 42], [7, 3, 30]]
    attn = ListPagedAttention(model.num_layers)
    attn.step([(0, 6), (1, 3)])
    ids = torch.tensor(seqs[0] + seqs[1])  # [T = 9], no padding
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2])
    logits = model.forward_paged(ids, positions, attn, logits_rows=torch.tensor([5, 8]))  # [2, V]
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(logits[row], _dense_last_logits(model, seq), atol=1e-5, rtol=0)
    # One decode step for both sequences at different positions.
    seqs[0].append(50)
    seqs[1].append(12)
    attn.step([(0, 1), (1, 1)])
    logits = model.forward_paged(torch.tensor([50, 12]), torch.tensor([6, 3]), attn)
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(logits[row], _dense_last_logits(model, seq), atol=1e-5, rtol=0)


def test_paged_attention_receives_post_rope_local_head_shapes():
    model = _model("llama_gqa")
    seen = []

    class Recorder(ListPagedAttention):
        def attend(self, layer, q, k, v):
            seen.append((layer, tuple(q.shape), tuple(k.shape), tuple(v.shape)))
            return super().attend(layer, q, k, v)

    attn = Recorder(model.num_layers)
    attn.step([(0, 3)])
    with torch.no_grad():
        model.forward_paged(torch.tensor([1, 2, 3]), torch.arange(3), attn, torch.tensor([2]))
    assert seen == [(0, (3, 4, 16), (3, 2, 16), (3, 2, 16)), (1, (3, 4, 16), (3, 2, 16), (3, 2, 16))]
    assert (model.num_heads_local, model.num_kv_heads_local, model.head_dim) == (4, 2, 16)
    assert model.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4


def test_forward_paged_rejects_mismatched_positions():
    model = _model("llama_gqa")
    with pytest.raises(ValueError, match=r"input_ids \(3,\) and positions \(2,\)"):
        model.forward_paged(torch.tensor([1, 2, 3]), torch.arange(2), ListPagedAttention(2))
