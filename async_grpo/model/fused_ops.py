"""Fused elementwise ops of the generation path: fewer, larger kernels per decoder layer.

A decode step is a few hundred tiny launches; the eager decoder spends several of them on each of
RMSNorm, the residual add, RoPE and SwiGLU's activation. Each op here does one of those jobs in one
launch (Triton, `fused_kernels.py`) and has a torch reference that is, by construction, the eager
decoder's own arithmetic:

- `add_rms_norm(x, residual, weight, eps)`: (norm(x + residual), x + residual), or norm(x) alone;
- `silu_and_mul(gate_up)`: silu(gate) * up of the fused gate|up projection's output;
- `rope_qk(qkv, cos, sin, ...)`: the fused q|k|v projection's output split into heads, q and k
  (optionally per-head RMS-normalised first, as Qwen3 does) rotated in the rotate-half layout of
  `rope.apply_rope`, v returned as a view.

The kernels run on CUDA tensors, and on CPU tensors when Triton's interpreter is on (tests); anywhere
else (plain CPU, or no Triton installed) the torch reference runs. `use_triton=False` forces the
reference, `True` demands a kernel. Only `Decoder.forward_paged` uses these (model/fused_decode.py);
the training forward stays eager so its gradients are untouched.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

from async_grpo.model.rope import apply_rope

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1) instead of compiling for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether the fused kernels can run on tensors of `device`: CUDA, or any device under the interpreter."""
    if not _triton_installed():
        return False
    return torch.device(device).type == "cuda" or interpreting()


def _resolve(use_triton: bool | None, device: torch.device, where: str) -> bool:
    available = triton_runs_on(device)
    if use_triton and not available:
        raise ValueError(
            f"{where}: use_triton=True but tensors are on '{device}': the kernels need a CUDA device "
            "(or TRITON_INTERPRET=1) and an installed triton"
        )
    return available if use_triton is None else use_triton


def _check_rows(t: torch.Tensor, name: str, where: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}: expected 2-D [tokens, features]")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{where}: {name} has dtype {t.dtype}: expected one of float32/float16/bfloat16")
    if t.shape[1] > 0 and t.stride(1) != 1:
        raise ValueError(f"{where}: {name} must have a contiguous last dimension (stride {t.stride(1)})")


# ---- add + RMSNorm ---------------------------------------------------------------------------


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager decoder's `s = x + residual; RMSNorm(s)`: returns (normed, s); s is x when residual is None."""
    s = x if residual is None else x + residual
    s32 = s.float()
    normed = weight * (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    return normed, s


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, N] (residual may be None), weight [N] -> (normed [T, N], new residual [T, N]).

    The new residual is x + residual rounded to the input dtype (x itself when residual is None);
    the statistics are fp32, the output is cast to the input dtype before the weight multiplies it.
    """
    where = "add_rms_norm"
    _check_rows(x, "x", where)
    n = x.shape[1]
    if residual is not None:
        _check_rows(residual, "residual", where)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"{where}: residual {tuple(residual.shape)} {residual.dtype}: expected x's {tuple(x.shape)} {x.dtype}"
            )
    if weight.shape != (n,) or weight.dtype != x.dtype:
        raise ValueError(f"{where}: weight {tuple(weight.shape)} {weight.dtype}: expected [{n}] {x.dtype}")
    if not _resolve(use_triton, x.device, where):
        return add_rms_norm_reference(x, residual, weight, eps)
    from async_grpo.model.fused_kernels import launch_add_rms_norm

    out = torch.empty_like(x)  # [T, N]
    res_out = torch.empty_like(x) if residual is not None else None  # [T, N]
    launch_add_rms_norm(x, residual, weight.contiguous(), eps, out, res_out)
    return out, (x if res_out is None else res_out)


# ---- SiLU(gate) * up -------------------------------------------------------------------------


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """The eager MLP's `silu(gate) * up` with gate_up = cat(gate, up) along the last dimension."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """gate_up [T, 2I] (gate columns, then up columns) -> silu(gate) * up [T, I]."""
    where = "silu_and_mul"
    _check_rows(gate_up, "gate_up", where)
    if gate_up.shape[1] % 2:
        raise ValueError(f"{where}: gate_up has {gate_up.shape[1]} columns: expected an even number [T, 2I]")
    if not _resolve(use_triton, gate_up.device, where):
        return silu_and_mul_reference(gate_up)
    from async_grpo.model.fused_kernels import launch_silu_and_mul

    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)  # [T, I]
    launch_silu_and_mul(gate_up, out)
    return out


# ---- q/k RoPE (and Qwen3's q/k norm) ---------------------------------------------------------


def _split_heads(
    qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = qkv.shape[0]
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (q.view(t, num_q_heads, head_dim), k.view(t, num_kv_heads, head_dim),
            v.view(t, num_kv_heads, head_dim))  # [T, Hq, D], [T, Hkv, D], [T, Hkv, D]


def rope_qk_reference(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int,
    q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eager attention's head split, optional q/k RMSNorm and `apply_rope`, on a fused qkv output."""
    q, k, v = _split_heads(qkv, num_q_heads, num_kv_heads, head_dim)
    if q_norm_weight is not None and k_norm_weight is not None:
        q = add_rms_norm_reference(q, None, q_norm_weight, eps)[0]
        k = add_rms_norm_reference(k, None, k_norm_weight, eps)[0]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def rope_qk(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int,
    q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [T, (Hq + 2 Hkv) D], cos/sin [T, D] (`RotaryEmbedding.cos_sin`, qkv's dtype) -> q [T, Hq, D],
    k [T, Hkv, D] rotated (new contiguous tensors) and v [T, Hkv, D] (a view of qkv).

    With q_norm_weight and k_norm_weight (both [D]) each q and k head is RMS-normalised before the rotation.
    """
    where = "rope_qk"
    _check_rows(qkv, "qkv", where)
    t = qkv.shape[0]
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    if qkv.shape[1] != width:
        raise ValueError(
            f"{where}: qkv has {qkv.shape[1]} columns: expected (num_q_heads {num_q_heads} + 2 * num_kv_heads "
            f"{num_kv_heads}) * head_dim {head_dim} = {width}"
        )
    if head_dim % 2:
        raise ValueError(f"{where}: head_dim = {head_dim}: expected an even number (rotate-half RoPE)")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (t, head_dim) or table.dtype != qkv.dtype:
            raise ValueError(
                f"{where}: {name} {tuple(table.shape)} {table.dtype}: expected [{t}, {head_dim}] {qkv.dtype}"
            )
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError(f"{where}: q_norm_weight and k_norm_weight must be given together (or neither)")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None and (w.shape != (head_dim,) or w.dtype != qkv.dtype):
            raise ValueError(f"{where}: {name} {tuple(w.shape)} {w.dtype}: expected [{head_dim}] {qkv.dtype}")
    if not _resolve(use_triton, qkv.device, where):
        return rope_qk_reference(qkv, cos, sin, num_q_heads, num_kv_heads, head_dim, q_norm_weight, k_norm_weight, eps)
    from async_grpo.model.fused_kernels import launch_rope_qk

    q = qkv.new_empty(t, num_q_heads, head_dim)  # [T, Hq, D]
    k = qkv.new_empty(t, num_kv_heads, head_dim)  # [T, Hkv, D]
    if cos.stride(1) != 1 or sin.stride(1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    launch_rope_qk(
        qkv, cos, sin, num_q_heads, num_kv_heads, head_dim,
        None if q_norm_weight is None else q_norm_weight.contiguous(),
        None if k_norm_weight is None else k_norm_weight.contiguous(), eps, q.view(t, -1), k.view(t, -1),
    )
    v = _split_heads(qkv, num_q_heads, num_kv_heads, head_dim)[2]
    return q, k, v
