"""The one seam between the decoder and the KV cache.

The decoder never knows how K/V are stored. For training it runs dense causal attention itself;
for generation it is handed a `PagedAttention` (built by kv/ for one forward step) and, in every
layer, calls `attend(layer, q, k, v)` with the new tokens' projections (RoPE already applied).
The implementation writes k/v into the paged pool and returns the attention output of the new
tokens against everything cached for their sequences.

Shapes (tokens of all sequences flattened, no padding):
    q: [T, num_q_heads_local, head_dim]
    k, v: [T, num_kv_heads_local, head_dim]
    returns: [T, num_q_heads_local, head_dim]
"""

from __future__ import annotations

from typing import Protocol

import torch


class PagedAttention(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...
