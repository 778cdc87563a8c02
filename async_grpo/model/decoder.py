"""The policy network: a Llama / Qwen2 / Qwen3 decoder with two entry points.

- `forward(input_ids [B, S])` is the training path: dense causal attention (torch SDPA) over
  right-padded rows, positions `arange(S)`. The learner calls it (under DeepSpeed).
- `forward_paged(input_ids [T], positions [T], attn, logits_rows)` is the generation path: the tokens
  of all sequences flattened with no padding; every layer hands its post-RoPE q/k/v to
  `attn.attend(layer, q, k, v)` (the seam in `attention_api.py`, implemented by kv/), which stores k/v
  in the paged pool and returns the attention output. Only `logits_rows` reach the lm_head.
  With `fused_ops=True` the same maths runs through fewer, fused kernels (model/fused_decode.py:
  one q|k|v and one gate|up GEMM per layer over concatenated copies of the weights, fused
  add + RMSNorm, RoPE and SwiGLU); `prepare_fused_decode()` builds those copies once, and
  `load_full_state_dict` keeps them equal to the parameters in place.

Parameter names are exactly Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`, ...), so state
dicts, checkpoints and weight broadcasts need no renaming. Under tensor parallelism (`tp_group`) the
projections are the sharded layers of `tensor_parallel.py`, heads are split across ranks, and the
logits are all-gathered so every rank sees the full vocabulary.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from async_grpo.model.args import ModelArgs
from async_grpo.model.attention_api import PagedAttention
from async_grpo.model.fused_decode import FusedDecodeWeights, fused_paged_layers
from async_grpo.model.rope import RotaryEmbedding, apply_rope
from async_grpo.model.tensor_parallel import (
    SHARDED_LAYERS,
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    TPGroup,
    VocabParallelEmbedding,
)

# (layer index, q [..., Hq, D], k [..., Hkv, D], v [..., Hkv, D]) -> attention output [..., Hq, D]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Device = torch.device | str | None
DType = torch.dtype | None

INIT_STD = 0.02  # the HF `initializer_range` default for Llama/Qwen


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and cast back before the weight, as HF does."""

    def __init__(self, dim: int, eps: float, device: Device = None, dtype: DType = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def dense_causal_attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Training-path attention: q [B, S, Hq, D], k/v [B, S, Hkv, D] -> [B, S, Hq, D], causal."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # [B, Hq, S, D]
    return out.transpose(1, 2)


class Attention(nn.Module):
    """GQA self-attention; q/k/v split across tensor-parallel ranks by whole heads, o_proj by rows."""

    def __init__(self, args: ModelArgs, layer_idx: int, tp: TPGroup, device: Device, dtype: DType):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, args.head_dim
        self.num_heads = tp.split(args.num_heads, "num_heads")
        self.num_kv_heads = tp.split(args.num_kv_heads, "num_kv_heads")
        hidden, q_out, kv_out = args.hidden_size, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.q_proj = ColumnParallelLinear(hidden, q_out, args.attention_bias, tp, device, dtype)
        self.k_proj = ColumnParallelLinear(hidden, kv_out, args.attention_bias, tp, device, dtype)
        self.v_proj = ColumnParallelLinear(hidden, kv_out, args.attention_bias, tp, device, dtype)
        self.o_proj = RowParallelLinear(q_out, hidden, args.attention_out_bias, tp, device, dtype)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps, device, dtype)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps, device, dtype)
        self.qk_norm = args.qk_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)  # [..., Hq, D]
        k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)  # [..., Hkv, D]
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)  # [..., Hkv, D]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(self.layer_idx, q, k, v)  # [..., Hq, D]
        return self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate/up split by columns, down by rows."""

    def __init__(self, args: ModelArgs, tp: TPGroup, device: Device, dtype: DType):
        super().__init__()
        tp.split(args.intermediate_size, "intermediate_size")
        hidden, inter = args.hidden_size, args.intermediate_size
        self.gate_proj = ColumnParallelLinear(hidden, inter, False, tp, device, dtype)
        self.up_proj = ColumnParallelLinear(hidden, inter, False, tp, device, dtype)
        self.down_proj = RowParallelLinear(inter, hidden, False, tp, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, args: ModelArgs, layer_idx: int, tp: TPGroup, device: Device, dtype: DType):
        super().__init__()
        self.self_attn = Attention(args, layer_idx, tp, device, dtype)
        self.mlp = MLP(args, tp, device, dtype)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """HF's `model.*` submodule: embeddings, layers, final norm."""

    def __init__(self, args: ModelArgs, tp: TPGroup, device: Device, dtype: DType):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size, tp, device, dtype)
        self.layers = nn.ModuleList(DecoderLayer(args, i, tp, device, dtype) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)


class Decoder(nn.Module):
    """Llama-family causal LM with HF parameter names; see the module docstring for the two paths."""

    def __init__(self, args: ModelArgs, tp_group: torch.distributed.ProcessGroup | None = None,
                 device: Device = None, dtype: DType = None):
        super().__init__()
        self.args = args
        self.tp = TPGroup.of(tp_group)
        self.gradient_checkpointing = False
        self.model = DecoderStack(args, self.tp, device, dtype)
        self.lm_head = ParallelLMHead(args.vocab_size, args.hidden_size, self.tp, device, dtype)
        if args.tie_word_embeddings:
            # One Parameter in two modules (as HF does): named_parameters() lists it once, under the
            # embedding's name, and ZeRO-3 gathers it for whichever module runs.
            self.lm_head.weight = self.model.embed_tokens.weight
            self._register_state_dict_hook(_drop_tied_head)
            self.register_load_state_dict_post_hook(_forgive_missing_tied_head)
        self.rotary = RotaryEmbedding(args, device)
        # Concatenated projection weights of the fused generation path; built by prepare_fused_decode().
        self._fused_decode: FusedDecodeWeights | None = None

    # ---- sizes the KV pool and the engine need (local = this tensor-parallel rank's share) ----
    @property
    def num_layers(self) -> int:
        return self.args.num_layers

    @property
    def hidden_size(self) -> int:
        return self.args.hidden_size

    @property
    def head_dim(self) -> int:
        return self.args.head_dim

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def num_heads_local(self) -> int:
        return self.args.num_heads // self.tp.size

    @property
    def num_kv_heads_local(self) -> int:
        return self.args.num_kv_heads // self.tp.size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V over all layers for one token on this rank."""
        itemsize = torch.empty((), dtype=dtype or self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads_local * self.head_dim * itemsize

    # ---- training path ----
    def forward(self, input_ids: torch.Tensor, hidden_only: bool = False) -> torch.Tensor:
        """input_ids [B, S] (right-padded) -> logits [B, S, V] in the model's dtype.

        hidden_only=True stops before the lm_head: final-norm hidden states [B, S, H], for the learner's
        fused lm_head + logprob path (a flag rather than a method, so it still runs through DeepSpeed's
        engine forward and its hooks).
        """
        hidden = self.hidden_states(input_ids)
        return hidden if hidden_only else self.lm_head(hidden)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] -> final-norm hidden states [B, S, H] (for callers that chunk the lm_head)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: expected [batch, seq]")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # [S]
        return self._run_layers(input_ids, positions, dense_causal_attend)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V] (full vocabulary on every tensor-parallel rank)."""
        return self.lm_head(hidden)

    # ---- generation path ----
    def forward_paged(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: PagedAttention,
                      logits_rows: torch.Tensor | None = None, fused_ops: bool = False) -> torch.Tensor:
        """input_ids, positions [T] (all sequences flattened) -> logits [R, V] for `logits_rows` (all if None).

        fused_ops=True runs the fused kernels (the weights' fused copies are built on first use unless
        `prepare_fused_decode` already built them; build them before capturing a CUDA graph).
        """
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)}: "
                "expected two 1-D tensors of the same length [T]"
            )
        if fused_ops:
            if self._fused_decode is None:
                self.prepare_fused_decode()
            assert self._fused_decode is not None
            hidden = fused_paged_layers(self, self._fused_decode, input_ids, positions, attn.attend)  # [T, H]
        else:
            hidden = self._run_layers(input_ids, positions, attn.attend)  # [T, H]
        if logits_rows is not None:
            hidden = hidden.index_select(0, logits_rows)  # [R, H]
        return self.lm_head(hidden)

    def prepare_fused_decode(self) -> None:
        """Build the fused q|k|v and gate|up weight copies of `forward_paged(fused_ops=True)`.

        Built once: a later call refreshes them in place (CUDA graphs of other engines on this model read
        them), unless the model has since moved to another device or dtype, which needs new ones.
        """
        if self._fused_decode is not None and self._fused_decode.matches(self):
            self._fused_decode.refresh()
        else:
            self._fused_decode = FusedDecodeWeights(self)

    def refresh_fused_decode_weights(self) -> None:
        """Copy every parameter into the fused copies in place (after writing parameters directly)."""
        if self._fused_decode is not None:
            self._fused_decode.refresh()

    def _run_layers(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [..., H]
        cos, sin = self.rotary.cos_sin(positions, x.dtype)  # [..., D]
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attend, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attend)
        return self.model.norm(x)

    # ---- weights ----
    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Seeded random init that is identical for every tensor-parallel split (full tensors drawn, then cut)."""
        gen = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            module, leaf = self._owner(name)
            if isinstance(module, RMSNorm):
                param.fill_(1.0)
                continue
            if leaf == "bias":
                param.zero_()
                continue
            full = torch.randn(self._full_shape(module, leaf, param), generator=gen) * INIT_STD
            param.copy_(self._shard(module, leaf, full))
        self.refresh_fused_decode_weights()

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy full (unsharded) HF-named tensors in; each tensor-parallel rank keeps its own shard.

        strict=False loads a subset (one broadcast bucket); unknown names are errors either way.
        """
        params = dict(self.named_parameters())
        ignorable = {"lm_head.weight"} if self.args.tie_word_embeddings else set()
        # Old checkpoints also store RoPE buffers; this decoder derives them from the config.
        unknown = [k for k in state
                   if k not in params and k not in ignorable and not k.endswith("rotary_emb.inv_freq")]
        if unknown:
            raise KeyError(f"unexpected weights {unknown[:5]}{'...' if len(unknown) > 5 else ''}: "
                           f"not parameters of this {self.args.architecture} decoder")
        if strict:
            missing = [k for k in params if k not in state]
            if missing:
                raise KeyError(f"missing weights {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for name, full in state.items():
            if name not in params:
                continue
            module, leaf = self._owner(name)
            param = params[name]
            expected = self._full_shape(module, leaf, param)
            if tuple(full.shape) != tuple(expected):
                raise ValueError(f"weight {name} has shape {tuple(full.shape)}: expected {tuple(expected)}")
            param.copy_(self._shard(module, leaf, full))
        if self._fused_decode is not None:
            # In place, so CUDA graphs captured against the fused copies see the new weights.
            self._fused_decode.refresh(state.keys())

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full HF-named tensors; under tensor parallelism every rank of the group must call it."""
        out: dict[str, torch.Tensor] = {}
        for name, param in self.named_parameters():
            module, leaf = self._owner(name)
            sharded = isinstance(module, SHARDED_LAYERS)
            out[name] = module.gather_full(leaf, param.detach()) if sharded else param.detach()
        return out

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        path, _, leaf = name.rpartition(".")
        return self.get_submodule(path), leaf

    def _full_shape(self, module: nn.Module, leaf: str, param: torch.Tensor) -> tuple[int, ...]:
        if isinstance(module, VocabParallelEmbedding):
            return (module.vocab_size, param.shape[1])
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            if leaf == "bias":
                return (module.out_features,)
            return (module.out_features, module.in_features)
        return tuple(param.shape)

    def _shard(self, module: nn.Module, leaf: str, full: torch.Tensor) -> torch.Tensor:
        return module.shard_full(leaf, full) if isinstance(module, SHARDED_LAYERS) else full


def _drop_tied_head(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # Tied checkpoints carry only the embedding, as HF writes them.
    state_dict.pop(prefix + "lm_head.weight", None)


def _forgive_missing_tied_head(module: nn.Module, incompatible) -> None:
    if "lm_head.weight" in incompatible.missing_keys:
        incompatible.missing_keys.remove("lm_head.weight")
