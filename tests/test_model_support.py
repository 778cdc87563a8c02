"""Shared pieces of the model tests: tiny random HF models and a plain reference `PagedAttention`.

No tests live here; the test_model_* files import it.
"""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

HF_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


def tiny_hf_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer random HF causal LM whose every weight (norms and biases too) is random, so parity is meaningful."""
    shape = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
    shape.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(HF_CONFIGS[family](**shape)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(centre + 0.1 * torch.randn(p.shape, generator=gen))
    return model


class ListPagedAttention:
    """Reference for the decoder <-> KV seam: per sequence and layer, the k/v so far as plain tensors.

    Before each `forward_paged` the test calls `step([(seq_id, n_new_tokens), ...])` with the order in
    which the sequences' tokens are flattened; `attend` then computes causal attention by definition.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.cache: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self.layout: list[tuple[int, int]] = []

    def step(self, layout: list[tuple[int, int]]) -> None:
        self.layout = layout

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        assert q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0] == sum(n for _, n in self.layout)
        outs, start = [], 0
        for seq, n in self.layout:
            per_layer = self.cache.setdefault(seq, [None] * self.num_layers)
            new_k, new_v = k[start:start + n], v[start:start + n]
            if per_layer[layer] is not None:
                new_k = torch.cat([per_layer[layer][0], new_k])
                new_v = torch.cat([per_layer[layer][1], new_v])
            per_layer[layer] = (new_k, new_v)
            past = new_k.shape[0] - n
            group = q.shape[1] // k.shape[1]
            keys = new_k.repeat_interleave(group, dim=1)  # [L, Hq, D]
            values = new_v.repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q[start:start + n], keys) / math.sqrt(q.shape[-1])
            key_pos = torch.arange(keys.shape[0], device=q.device)  # [L]
            query_pos = past + torch.arange(n, device=q.device)  # [n]
            visible = key_pos[None, :] <= query_pos[:, None]  # [n, L]
            probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            outs.append(torch.einsum("hqk,khd->qhd", probs, values))
            start += n
        return torch.cat(outs)
