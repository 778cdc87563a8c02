"""Reference paged attention in plain torch: the CPU path and the ground truth for the fused kernels.

Implements `model.attention_api.PagedAttention` for one forward step. `attend(layer, q, k, v)`
writes the step's new K/V into their slots, then lets every new token attend to its own sequence's
cached tokens up to and including itself, reading the pool through the block tables.

All sequences are handled by one batched op per layer: each sequence's context is gathered into a
padded [B, max_ctx] view and its new tokens into a padded [B, max_q] query, then one masked SDPA.
The gather copies each step's context, which is what the fused kernels avoid; here clarity wins.
The padding lives only in these temporaries, never in the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from async_grpo.kv.pool import KVPool
from async_grpo.kv.step_metadata import StepMetadata


class TorchPagedAttention:
    def __init__(self, pool: KVPool, meta: StepMetadata):
        self.pool = pool
        self.meta = meta
        b, bs = meta.num_seqs, meta.block_size
        max_q, max_ctx = meta.max_query_len, meta.max_context_len
        num_tokens = meta.slot_mapping.shape[0]
        dev = meta.slot_mapping.device
        ctx_pos = torch.arange(max_ctx, device=dev)  # [max_ctx]
        blocks = meta.block_tables.long().gather(1, (ctx_pos // bs).expand(b, max_ctx))  # [B, max_ctx]
        self._context_slots = blocks * bs + ctx_pos % bs  # [B, max_ctx]
        q_lens = meta.query_lens.long()
        token_seq = torch.repeat_interleave(
            torch.arange(b, device=dev), q_lens, output_size=num_tokens
        )  # [T]
        token_row = torch.arange(num_tokens, device=dev) - meta.cu_query_lens.long()[token_seq]  # [T]
        self._query_index = token_seq * max_q + token_row  # [T] flat index into [B * max_q]
        row = torch.arange(max_q, device=dev)  # [max_q]
        q_pos = meta.context_lens.long()[:, None] - q_lens[:, None] + row[None, :]  # [B, max_q]
        # Padding query rows look at position 0 only, so no row is fully masked (SDPA would give NaN).
        q_pos = torch.where(row[None, :] < q_lens[:, None], q_pos, 0)
        # Causal within the sequence; q_pos < context_len also hides the padded context tail.
        self._mask = (ctx_pos[None, None, :] <= q_pos[:, :, None])[:, None]  # [B, 1, max_q, max_ctx]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache = self.pool.key_cache[layer]
        v_cache = self.pool.value_cache[layer]
        _, _, kv_heads, head_dim = k_cache.shape
        flat_k = k_cache.view(-1, kv_heads, head_dim)  # [num_blocks * block_size, Hkv, D]
        flat_v = v_cache.view(-1, kv_heads, head_dim)
        flat_k.index_copy_(0, self.meta.slot_mapping, k.to(k_cache.dtype))
        flat_v.index_copy_(0, self.meta.slot_mapping, v.to(v_cache.dtype))

        b, max_q = self.meta.num_seqs, self.meta.max_query_len
        num_q_heads = q.shape[1]
        keys = flat_k[self._context_slots]  # [B, max_ctx, Hkv, D]
        values = flat_v[self._context_slots]  # [B, max_ctx, Hkv, D]
        queries = q.new_zeros(b * max_q, num_q_heads, head_dim)  # [B * max_q, Hq, D]
        queries[self._query_index] = q
        out = F.scaled_dot_product_attention(
            queries.view(b, max_q, num_q_heads, head_dim).transpose(1, 2),
            keys.transpose(1, 2).to(q.dtype),
            values.transpose(1, 2).to(q.dtype),
            attn_mask=self._mask,
            enable_gqa=num_q_heads != kv_heads,
        )  # [B, Hq, max_q, D]
        return out.transpose(1, 2).reshape(b * max_q, num_q_heads, head_dim)[self._query_index]  # [T, Hq, D]
