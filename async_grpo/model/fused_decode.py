"""The generation path's fused layer stack: one q|k|v GEMM, one gate|up GEMM, fused norms, RoPE and SwiGLU.

`Decoder.forward_paged(..., fused_ops=True)` runs its layers through `fused_paged_layers` instead of
the eager modules. Per layer that is qkv GEMM, `rope_qk`, attention, o_proj, `add_rms_norm`, gate_up
GEMM, `silu_and_mul`, down_proj, `add_rms_norm`: about ten launches where the eager layer takes
about forty. The residual stream is carried between layers, so each add joins the next norm.

The fused projections need concatenated weights. `FusedDecodeWeights` builds them once, as
persistent buffers beside the HF-named parameters (which stay as they are, so state dicts,
checkpoints and weight broadcasts do not change), and `refresh` copies parameters into them in
place: CUDA graphs captured against the buffers stay valid across weight updates.
`Decoder.load_full_state_dict` and `init_weights` call `refresh` for the names they load; code
that writes parameters any other way must call `Decoder.refresh_fused_decode_weights()`.
Under tensor parallelism each rank concatenates its own shards (its q, k and v heads; its gate and
up columns), which is exactly the layout its fused output must have.
The copies cost memory: one more copy of every q/k/v and gate/up weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import torch
import torch.nn.functional as F

from async_grpo.model.fused_ops import add_rms_norm, rope_qk, silu_and_mul

if TYPE_CHECKING:
    from async_grpo.model.decoder import Decoder

# (layer index, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> attention output [T, Hq, D]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Piece:
    """Where one parameter lives inside a fused buffer: rows [start, start + rows) of `buffer`."""

    param: torch.nn.Parameter
    buffer: torch.Tensor
    start: int

    def copy_in(self) -> None:
        self.buffer.narrow(0, self.start, self.param.shape[0]).copy_(self.param.detach())


@dataclass(frozen=True)
class FusedLayerWeights:
    qkv_weight: torch.Tensor  # [(Hq + 2 Hkv) D / tp, H]
    qkv_bias: torch.Tensor | None  # [(Hq + 2 Hkv) D / tp]
    gate_up_weight: torch.Tensor  # [2 I / tp, H]


class FusedDecodeWeights:
    """Per layer the concatenated q|k|v and gate|up weights of this rank, kept equal to the parameters."""

    def __init__(self, model: "Decoder"):
        self.device, self.dtype = model.device, model.dtype
        self.layers: list[FusedLayerWeights] = []
        self._pieces: dict[str, _Piece] = {}  # HF parameter name -> its place in a fused buffer
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            prefix = f"model.layers.{i}."
            qkv_weight = self._fuse(prefix + "self_attn", ("q_proj", "k_proj", "v_proj"), attn, "weight")
            qkv_bias = None
            if attn.q_proj.bias is not None:
                qkv_bias = self._fuse(prefix + "self_attn", ("q_proj", "k_proj", "v_proj"), attn, "bias")
            gate_up = self._fuse(prefix + "mlp", ("gate_proj", "up_proj"), mlp, "weight")
            self.layers.append(FusedLayerWeights(qkv_weight, qkv_bias, gate_up))

    def _fuse(self, owner: str, parts: tuple[str, ...], module: torch.nn.Module, leaf: str) -> torch.Tensor:
        params = [getattr(getattr(module, part), leaf) for part in parts]
        # A normal tensor even when first built inside inference mode, so later in-place refreshes are allowed.
        with torch.inference_mode(False), torch.no_grad():
            buffer = torch.cat([p.detach() for p in params])  # [sum of rows, ...], its own storage
        start = 0
        for part, param in zip(parts, params):
            self._pieces[f"{owner}.{part}.{leaf}"] = _Piece(param, buffer, start)
            start += param.shape[0]
        return buffer

    @torch.no_grad()
    def refresh(self, names: Iterable[str] | None = None) -> None:
        """Copy the named parameters (all when None) into their places; names not fused are ignored."""
        pieces = self._pieces.values() if names is None else (self._pieces[n] for n in names if n in self._pieces)
        for piece in pieces:
            piece.copy_in()

    def matches(self, model: "Decoder") -> bool:
        """Whether these copies still have the model's device and dtype."""
        return (model.device, model.dtype) == (self.device, self.dtype)

    def check_matches(self, model: "Decoder") -> None:
        if not self.matches(model):
            raise RuntimeError(
                f"fused decode weights were built for {self.device} {self.dtype}, but the model is now on "
                f"{model.device} {model.dtype}: call model.prepare_fused_decode() again after moving it"
            )


def fused_paged_layers(
    model: "Decoder", weights: FusedDecodeWeights, input_ids: torch.Tensor, positions: torch.Tensor,
    attend: AttendFn,
) -> torch.Tensor:
    """input_ids, positions [T] -> final-norm hidden states [T, H], as `Decoder._run_layers` computes them."""
    weights.check_matches(model)
    stack = model.model
    x = stack.embed_tokens(input_ids)  # [T, H]
    t = x.shape[0]
    cos, sin = model.rotary.cos_sin(positions, x.dtype)  # [T, D]
    layers = stack.layers
    first_norm = layers[0].input_layernorm
    h, residual = add_rms_norm(x, None, first_norm.weight, first_norm.eps)  # [T, H] each
    for i, layer in enumerate(layers):
        attn, w = layer.self_attn, weights.layers[i]
        qkv = F.linear(h, w.qkv_weight, w.qkv_bias)  # [T, (Hq + 2 Hkv) D]
        q_norm = attn.q_norm.weight if attn.qk_norm else None
        k_norm = attn.k_norm.weight if attn.qk_norm else None
        eps = attn.q_norm.eps if attn.qk_norm else 0.0
        q, k, v = rope_qk(qkv, cos, sin, attn.num_heads, attn.num_kv_heads, attn.head_dim, q_norm, k_norm, eps)
        out = attend(i, q, k, v)  # [T, Hq, D]
        attn_out = attn.o_proj(out.reshape(t, attn.num_heads * attn.head_dim))  # [T, H]
        post = layer.post_attention_layernorm
        h, residual = add_rms_norm(attn_out, residual, post.weight, post.eps)
        gate_up = F.linear(h, w.gate_up_weight)  # [T, 2 I / tp]
        mlp_out = layer.mlp.down_proj(silu_and_mul(gate_up))  # [T, H]
        # The residual add of this layer's MLP joins the next norm: the next layer's input norm, or the final one.
        nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else stack.norm
        h, residual = add_rms_norm(mlp_out, residual, nxt.weight, nxt.eps)
    return h
