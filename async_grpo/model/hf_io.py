"""Hugging Face checkpoint directories in and out: config.json + safetensors, single file or sharded.

`load_pretrained` reads what `transformers` writes (one `model.safetensors`, or shards listed in
`model.safetensors.index.json`), one tensor at a time, each tensor-parallel rank keeping its shard.
`save_pretrained` writes the full (unsharded) tensors under their HF names with a config.json and a
generation_config.json, so the trained policy loads with `transformers.AutoModelForCausalLM`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from async_grpo.model.args import ModelArgs
from async_grpo.model.decoder import Decoder

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def read_model_args(path: str | Path) -> ModelArgs:
    """The `ModelArgs` of a checkpoint directory (config.json only; no weights are read)."""
    config_path = Path(path) / CONFIG_FILE
    if not Path(path).is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    if not config_path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} has no {CONFIG_FILE} (expected {config_path})")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    return ModelArgs.from_hf_config(hf)


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the single file, or every shard its index lists."""
    root = Path(path)
    single, index = root / WEIGHTS_FILE, root / WEIGHTS_INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [root / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {str(path)!r}: {WEIGHTS_INDEX_FILE} lists missing shard(s) {missing}")
        return files
    raise FileNotFoundError(
        f"checkpoint {str(path)!r} has no weights: expected {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} with its shards"
    )


def load_pretrained(path: str | Path, dtype: torch.dtype, device: torch.device | str,
                    tp_group: dist.ProcessGroup | None = None) -> Decoder:
    """A `Decoder` with the checkpoint's weights in `dtype` on `device` (this rank's shard under TP)."""
    args = read_model_args(path)
    files = weight_files(path)
    model = Decoder(args, tp_group=tp_group, device=device, dtype=dtype)
    expected = {name for name, _ in model.named_parameters()}
    seen: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                # One tensor at a time: peak memory is the model plus its largest tensor.
                model.load_full_state_dict({name: f.get_tensor(name).to(dtype)}, strict=False)
                seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        raise KeyError(f"checkpoint {str(path)!r} lacks weights {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return model.eval()


def save_pretrained(model_or_state_dict: Decoder | dict[str, torch.Tensor], args: ModelArgs, path: str | Path,
                    dtype: torch.dtype | None = None) -> None:
    """Write config.json, generation_config.json and model.safetensors (full tensors) to `path`.

    Given a tensor-parallel `Decoder`, every rank of its group must call this (the shards are
    gathered); only the group's rank 0 writes.
    """
    if isinstance(model_or_state_dict, Decoder):
        state = model_or_state_dict.full_state_dict()
        if model_or_state_dict.tp.rank != 0:
            return
    else:
        state = dict(model_or_state_dict)
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors = {
        name: (t.detach().to(dtype) if dtype is not None else t.detach()).cpu().contiguous()
        for name, t in state.items()
    }
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / WEIGHTS_FILE), metadata={"format": "pt"})
    hf = args.to_hf_config()
    stored = next(iter(tensors.values())).dtype if tensors else torch.float32
    hf["torch_dtype"] = hf["dtype"] = _DTYPE_NAMES.get(stored, "float32")
    (root / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    generation = {"bos_token_id": args.bos_token_id, "eos_token_id": hf["eos_token_id"]}
    (root / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
