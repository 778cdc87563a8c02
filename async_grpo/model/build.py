"""The one entry point that turns `cfg.model` into a `Decoder`: a checkpoint directory or a seeded preset.

The learner and every rollout worker call `build_model` with the same config and so start from the
same weights (a preset's init draws full tensors from `init_seed`, then each tensor-parallel rank
keeps its shard).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from async_grpo.config import ModelConfig
from async_grpo.model.args import PRESETS, ModelArgs
from async_grpo.model.decoder import Decoder
from async_grpo.model.hf_io import load_pretrained, read_model_args

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_args_of(cfg: ModelConfig) -> ModelArgs:
    """The shape `build_model` will build, without building it."""
    if cfg.path is not None:
        return read_model_args(cfg.path)
    if cfg.preset is None:
        raise ValueError("model.path and model.preset are both unset: expected a checkpoint directory or a preset")
    if cfg.preset not in PRESETS:
        raise ValueError(f"model.preset = {cfg.preset!r}: expected one of {sorted(PRESETS)}")
    args = PRESETS[cfg.preset]
    return args if cfg.vocab_size is None else args.replace(vocab_size=cfg.vocab_size)


def build_model(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype | None = None,
                tp_group: dist.ProcessGroup | None = None) -> Decoder:
    """Load `cfg.path`, or build `cfg.preset` with a seeded init; `dtype` defaults to `cfg.dtype`."""
    dtype = dtype or DTYPES[cfg.dtype]
    if cfg.path is not None:
        return load_pretrained(cfg.path, dtype, device, tp_group)
    model = Decoder(model_args_of(cfg), tp_group=tp_group, device=device, dtype=dtype)
    model.init_weights(cfg.init_seed)
    return model
