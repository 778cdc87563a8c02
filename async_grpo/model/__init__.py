"""The policy network: Llama / Qwen2 / Qwen3 decoder, HF checkpoint I/O and tensor-parallel layers.

`Decoder` has a dense training path (`forward`) and a paged generation path (`forward_paged`, which
talks to the KV cache only through `attention_api.PagedAttention`). `build_model(cfg.model, ...)` is
how every process gets one; `load_pretrained` / `save_pretrained` move HF checkpoints.
"""

from async_grpo.model.args import PRESETS, ModelArgs
from async_grpo.model.attention_api import PagedAttention
from async_grpo.model.build import build_model, model_args_of
from async_grpo.model.decoder import Decoder
from async_grpo.model.hf_io import load_pretrained, save_pretrained
from async_grpo.model.logprobs import token_entropy, token_logprobs

__all__ = [
    "PRESETS", "ModelArgs", "PagedAttention", "Decoder", "build_model", "model_args_of",
    "load_pretrained", "save_pretrained", "token_logprobs", "token_entropy",
]
