"""Checks a run config against the files and sizes it names, before any process or group starts.

`async-grpo train` calls `check_run_config` in the launching process (and in every rank under
torchrun, before any process group), so that a missing model directory, an unknown preset, a prompt
file that is not there, a missing CURVE key file, or a KV budget that cannot hold one group of G
samples is one ConfigError (exit 2) naming the key, instead of N processes failing at once, or a
worker failing mid-run.
"""

from __future__ import annotations

from pathlib import Path

from async_grpo.config import ConfigError, RunConfig


def check_model(cfg: RunConfig):
    """The model's shape (ModelArgs), or a ConfigError naming model.path / model.preset."""
    from async_grpo.model.build import model_args_of

    if cfg.model.path is not None:
        path = Path(cfg.model.path)
        if not path.is_dir():
            raise ConfigError("model.path", cfg.model.path, "an existing Hugging Face checkpoint directory")
        if not (path / "config.json").is_file():
            raise ConfigError("model.path", cfg.model.path, "a checkpoint directory with a config.json")
    try:
        return model_args_of(cfg.model)
    except (ValueError, OSError) as err:
        key = "model.path" if cfg.model.path is not None else "model.preset"
        raise ConfigError(key, cfg.model.path or cfg.model.preset, str(err)) from None


def blocks_for_one_group(prompt_len: int, group_size: int, max_new_tokens: int, block_size: int) -> int:
    """KV blocks one group needs at worst: the prompt's full blocks once, each sample its own rest."""
    shared = prompt_len // block_size
    per_sample = -(-(prompt_len + max_new_tokens - 1) // block_size) - shared
    return shared + group_size * per_sample


def check_kv_budget(cfg: RunConfig, args, max_prompt_len: int) -> int:
    """The smallest pool's block count, or a ConfigError when a pool cannot hold one group of the longest prompt."""
    from async_grpo.kv.pool import num_blocks_for
    from async_grpo.model.build import DTYPES

    key = "workers.group_tp_sizes" if cfg.workers.group_tp_sizes is not None else "workers.tp_size"
    smallest = None
    for tp in sorted(set(cfg.workers.group_tp_sizes or [cfg.workers.tp_size])):
        if args.num_kv_heads % tp or args.num_heads % tp:
            raise ConfigError(
                key, cfg.workers.group_tp_sizes or tp,
                f"sizes dividing the model's {args.num_heads} attention heads and {args.num_kv_heads} KV heads",
            )
        try:
            blocks = num_blocks_for(cfg.kv, args.num_layers, args.num_kv_heads // tp, args.head_dim,
                                    DTYPES[cfg.model.dtype])
        except ValueError as err:
            raise ConfigError("kv.memory_gb", cfg.kv.memory_gb, str(err)) from None
        smallest = blocks if smallest is None else min(smallest, blocks)
    need = blocks_for_one_group(max_prompt_len, cfg.workers.group_size, cfg.sampling.max_new_tokens, cfg.kv.block_size)
    if smallest < need:
        key, value = ("kv.num_blocks", cfg.kv.num_blocks) if cfg.kv.num_blocks is not None else ("kv.memory_gb", cfg.kv.memory_gb)
        raise ConfigError(
            key, value,
            f"room for at least one group: {need} blocks of {cfg.kv.block_size} tokens for a {max_prompt_len}-token "
            f"prompt x {cfg.workers.group_size} samples x {cfg.sampling.max_new_tokens} new tokens, "
            f"but the pool has {smallest}",
        )
    return smallest


def check_curve(cfg: RunConfig) -> None:
    """With CURVE on: the key files and allowed-clients directory exist, and the receive queue can deliver."""
    curve = cfg.transport.curve
    if not curve.enabled:
        return
    for key in ("server_secret_file", "server_public_file", "client_secret_file"):
        value = getattr(curve, key)
        if not Path(value).is_file():
            raise ConfigError(f"transport.curve.{key}", value, "an existing zmq.auth certificate file")
    if not Path(curve.allowed_clients_dir).is_dir():
        raise ConfigError("transport.curve.allowed_clients_dir", curve.allowed_clients_dir,
                          "an existing directory of allowed public key files")


def check_run_config(cfg: RunConfig) -> None:
    """Every check that needs no process group (model, task, KV budget, CURVE keys)."""
    check_curve(cfg)
    args = check_model(cfg)
    if cfg.task.path is not None and not Path(cfg.task.path).is_file():
        raise ConfigError("task.path", cfg.task.path, "an existing JSONL or Parquet prompt file")
    from async_grpo.tasks.base import build_task

    try:
        task = build_task(cfg.task, cfg.seed, tokenizer_path=cfg.model.path)
    except ConfigError:
        raise
    except (ValueError, OSError, ImportError) as err:
        raise ConfigError("task", cfg.task.name, str(err)) from None
    try:
        if task.tokenizer.vocab_size > args.vocab_size:
            raise ConfigError(
                "model.vocab_size", args.vocab_size,
                f"at least the task tokenizer's {task.tokenizer.vocab_size} tokens",
            )
        max_prompt = task.max_prompt_len() if hasattr(task, "max_prompt_len") else 0
    finally:
        task.close()
    if max_prompt + cfg.sampling.max_new_tokens > args.max_position_embeddings:
        raise ConfigError(
            "sampling.max_new_tokens", cfg.sampling.max_new_tokens,
            f"at most {args.max_position_embeddings - max_prompt} (the model has {args.max_position_embeddings} "
            f"positions and the longest prompt {max_prompt} tokens)",
        )
    check_kv_budget(cfg, args, max(1, max_prompt))
