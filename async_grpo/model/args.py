"""The decoder's shape: one dataclass, its Hugging Face config mapping, and the built-in presets.

`ModelArgs` is all the decoder needs to build itself. It is read from a Hugging Face `config.json`
(`from_hf_config`, Llama / Qwen2 / Qwen3 families) and written back (`to_hf_config`) so that a policy
trained here loads in `transformers` unchanged. `PRESETS` names shapes for training from scratch (the
embedded demo) and for benchmarks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_MODEL_TYPE_OF_CLASS = {cls: kind for kind, cls in ARCHITECTURES.items()}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArgs:
    """Shape and numerics of a Llama-family decoder (Llama, Qwen2, Qwen3)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF form: {"rope_type": "linear"|"llama3", "factor": ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (always on for Qwen2)
    attention_out_bias: bool = False  # bias on o_proj (Llama/Qwen3 `attention_bias: true`)
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k before RoPE
    architecture: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}: expected one of {sorted(ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelArgs.{name} = {value!r}: expected a positive integer")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads = {self.num_heads} is not a multiple of num_kv_heads = {self.num_kv_heads} "
                "(grouped-query attention needs whole groups)"
            )
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling type {rope_type!r}: expected one of {list(ROPE_TYPES)}")

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ModelArgs":
        """Read a Hugging Face `config.json` dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        kind = _architecture_of(hf)
        if hf.get("mlp_bias"):
            raise ValueError(f"unsupported config: mlp_bias = {hf['mlp_bias']!r} (expected false)")
        if hf.get("use_sliding_window"):
            raise ValueError("unsupported config: use_sliding_window = true (sliding-window attention is not built)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported config: hidden_act = {hf['hidden_act']!r} (expected 'silu')")
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        rope_theta, rope_scaling = _rope_from_hf(hf)
        eos = hf.get("eos_token_id")
        bias = bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if kind == "qwen2" else bias,
            attention_out_bias=False if kind == "qwen2" else bias,
            qk_norm=kind == "qwen3",
            architecture=kind,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=[] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos],
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A `config.json` dict that `transformers.AutoConfig` reads as this architecture."""
        if self.architecture == "qwen2" and (not self.attention_bias or self.attention_out_bias):
            raise ValueError("qwen2 checkpoints always have q/k/v bias and no o_proj bias; these args differ")
        if self.architecture != "qwen2" and self.attention_bias != self.attention_out_bias:
            raise ValueError(f"{self.architecture} has one attention_bias flag for q/k/v/o; these args differ")
        if self.qk_norm != (self.architecture == "qwen3"):
            raise ValueError(f"qk_norm = {self.qk_norm} does not match architecture {self.architecture!r}")
        rope_parameters: dict[str, Any] = {"rope_type": "default", **(self.rope_scaling or {})}
        rope_parameters.pop("type", None)
        rope_parameters["rope_theta"] = self.rope_theta
        eos: int | list[int] | None = (
            None if not self.eos_token_ids else self.eos_token_ids[0] if len(self.eos_token_ids) == 1
            else list(self.eos_token_ids)
        )
        hf: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta/rope_scaling.
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
        }
        if self.architecture != "qwen2":
            hf["attention_bias"] = self.attention_bias
        return hf


def _architecture_of(hf: dict[str, Any]) -> str:
    classes = hf.get("architectures") or []
    for name in classes:
        if name in _MODEL_TYPE_OF_CLASS:
            return _MODEL_TYPE_OF_CLASS[name]
    model_type = hf.get("model_type")
    if not classes and model_type in ARCHITECTURES:
        return model_type
    found = classes or model_type
    raise ValueError(
        f"unsupported architecture {found!r}: expected one of {sorted(ARCHITECTURES.values())} "
        f"(model_type one of {sorted(ARCHITECTURES)})"
    )


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling")
    if legacy:
        params = {**legacy, **params}
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {rope_type!r}: expected one of {list(ROPE_TYPES)}")
    params.pop("type", None)
    params["rope_type"] = rope_type
    return theta, params


PRESETS: dict[str, ModelArgs] = {
    # The embedded CPU demo's policy; the task overrides vocab_size.
    "tiny": ModelArgs(
        vocab_size=64, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=32, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False,
        architecture="llama",
    ),
    # The Qwen2-0.5B shape (random weights) for benchmarks.
    "qwen2-0.5b": ModelArgs(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
        head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
        tie_word_embeddings=True, attention_bias=True, architecture="qwen2",
        bos_token_id=151643, eos_token_ids=[151643],
    ),
}
