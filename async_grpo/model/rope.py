"""Rotary position embedding with the Hugging Face frequency schedules (default, linear, llama3).

Frequencies are computed once in fp32 from `ModelArgs`; `cos_sin(positions)` turns any positions
(a dense `arange(S)` for training, arbitrary per-token positions for paged generation) into the
cos/sin tables, and `apply_rope` rotates q or k in the "rotate half" layout that HF checkpoints use.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from async_grpo.model.args import ModelArgs


def inverse_frequencies(args: ModelArgs) -> torch.Tensor:
    """fp32 [head_dim / 2]: theta^(-2i/d), rescaled as the config's rope scaling says."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling or {}
    if args.rope_type == "linear":
        # Scaling positions by 1/factor is the same as scaling the frequencies.
        return inv_freq / float(scaling["factor"])
    if args.rope_type == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    return inv_freq


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend in between."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Holds the fp32 frequencies (a non-persistent buffer: not part of any state dict)."""

    def __init__(self, args: ModelArgs, device: torch.device | str | None = None):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(args).to(device), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] -> cos, sin [..., head_dim], computed in fp32 and cast like HF does."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [..., D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [..., D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, D] rotated by cos/sin [..., D] (broadcast over the heads)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
