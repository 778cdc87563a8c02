"""Typed run configuration: pydantic models, YAML files and dotted `key=value` overrides.

Every process of a run (learner ranks, rollout workers, the CLI) reads the same `RunConfig`. Each
subpackage takes only its own section (`cfg.kv`, `cfg.learner`, ...), so the sections are the
contract between them. Unknown keys and wrong types are errors that name the key, the value and
what was expected (`ConfigError`); the CLI turns them into exit code 2 without a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A bad configuration value: names the key, the value and what was expected."""

    def __init__(self, key: str, value: Any, expected: str, source: str | None = None):
        self.key, self.value, self.expected, self.source = key, value, expected, source
        where = f" (from {source})" if source else ""
        super().__init__(f"config key '{key}' = {value!r}{where}: expected {expected}")


class _Section(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which policy to train: a Hugging Face checkpoint directory, or a built-in preset from scratch."""

    path: str | None = None  # HF checkpoint dir (config.json + *.safetensors)
    preset: str | None = "tiny"  # name in model.presets when no path is given
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    vocab_size: int | None = None  # presets only: overrides the preset's vocabulary (set by the task)
    init_seed: int = 0  # presets only: seed of the random init (learner and workers draw the same weights)


class KVConfig(_Section):
    """Paged KV pool of each rollout worker, sized once at start."""

    block_size: int = Field(16, ge=1)
    num_blocks: int | None = Field(None, ge=1)  # exact block count; wins over memory_gb
    memory_gb: float = Field(0.25, gt=0)  # budget for K and V of all layers
    attention: Literal["auto", "torch", "triton", "flash"] = "auto"
    # CUDA only: replay the decode step from CUDA graphs captured per batch-size bucket (fused backend).
    cuda_graphs: bool = True
    cuda_graph_max_rows: int = Field(512, ge=1)  # largest captured bucket; bigger decode batches run eagerly
    # Decode attention reading each group's shared prompt blocks once for all its samples (Triton backend):
    # "auto" uses it on steps where a group has >= 2 live samples sharing a full block, "on" whenever a
    # group shares a full block (an error on other backends), "off" never. On the CPU's torch backend
    # "auto" is "off".
    shared_prefix: Literal["auto", "on", "off"] = "auto"
    # Generation forward through fused kernels (model/fused_ops.py): one q|k|v and one gate|up GEMM per
    # layer, fused add + RMSNorm, RoPE and SwiGLU. "auto": on for a CUDA engine (1.6x the decode rate
    # there), off on the CPU, where the kernels would only run in Triton's interpreter.
    fused_decode_ops: bool | Literal["auto"] = "auto"


class SamplingConfig(_Section):
    """How each completion is sampled; logprobs are taken after every transform."""

    temperature: float = Field(1.0, ge=0)  # 0 means greedy
    top_k: int = Field(0, ge=0)  # 0: off
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(32, ge=1)
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)


class WorkersConfig(_Section):
    """Rollout worker groups: every non-learner rank, `tp_size` ranks per group."""

    tp_size: int = Field(1, ge=1)
    # Per-group sizes in rank order when the groups differ (e.g. [1, 2]); None: every group has tp_size.
    group_tp_sizes: list[int] | None = None
    prompts_per_batch: int = Field(8, ge=1)  # B: prompts generated together
    group_size: int = Field(8, ge=1)  # G: samples per prompt
    device: Literal["auto", "cpu", "cuda"] = "auto"


class LossConfig(_Section):
    """GRPO loss variants (see learner/loss.py for the formulas)."""

    eps_low: float = Field(0.2, ge=0)
    eps_high: float = Field(0.28, ge=0)  # DAPO clip-higher
    correction: Literal["none", "tis"] = "tis"  # truncated importance weight for policy lag
    is_cap: float = Field(2.0, gt=0)
    aggregation: Literal["token_mean", "seq_mean", "constant"] = "token_mean"
    constant_normalizer: int | None = Field(None, ge=1)  # Dr.GRPO; default max_new_tokens
    kl_beta: float = Field(0.0, ge=0)  # k3 KL to a frozen reference
    reference_device: Literal["same", "cpu"] = "same"


class AdvantageConfig(_Section):
    """Group-relative advantages, computed by the workers (which hold whole groups)."""

    std_normalize: bool = True  # False: Dr.GRPO (mean-centred only)
    filter_zero_variance: bool = False  # DAPO dynamic sampling
    eps: float = Field(1e-6, ge=0)  # added to the group std before dividing


class LearnerConfig(_Section):
    """DeepSpeed ZeRO learner: ranks [0, num_ranks) of the job."""

    num_ranks: int = Field(1, ge=1)
    zero_stage: Literal[1, 2, 3] = 2
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    grad_clip: float = Field(1.0, gt=0)
    samples_per_step: int = Field(64, ge=1)  # trajectories consumed per optimiser step
    micro_batch_tokens: int = Field(8192, ge=1)  # token budget of one micro-batch
    device: Literal["auto", "cpu", "cuda"] = "auto"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine/linear decay ends at lr * min_lr_ratio
    decay_steps: int | None = Field(None, ge=1)  # schedule length; default trainer.max_steps
    optimizer: Literal["auto", "torch_adamw", "fused_adam"] = "auto"  # auto: FusedAdam on GPU
    gradient_checkpointing: bool = False  # recompute layer activations in backward
    pad_token_id: int = Field(0, ge=0)  # fills right padding; masked out of the loss
    # lm_head fused with the token logprobs and entropy, at completion positions only, logits recomputed
    # in backward (model/fused_logprobs.py). "auto": on under ZeRO-1/2 (ZeRO-3 would have to gather the
    # lm_head outside its module); false: full [B, S, V] logits, then model/logprobs.py.
    fused_logprobs: bool | Literal["auto"] = "auto"
    # DeepSpeed ZeRO-1/2's per-gradient overflow check and norm as one multi-tensor kernel each
    # (learner/zero_grad_checks.py): same results, a fraction of the host time of a step.
    fused_grad_checks: bool = True
    # fp32 MiB of one chunk's [rows, V] logits on the fused path: fewer, larger lm_head GEMMs against memory.
    logprob_chunk_mb: int = Field(1024, ge=1)
    # torch.compile of every decoder layer (and the fused logprob chunks) before DeepSpeed wraps the model.
    # "auto": on for CUDA under ZeRO-1/2; off on the CPU, where inductor's compile time outweighs a short run.
    compile: bool | Literal["auto"] = "auto"
    loss: LossConfig = Field(default_factory=LossConfig)
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)


class CurveConfig(_Section):
    """ZeroMQ CURVE authentication: key files (zmq.auth format)."""

    enabled: bool = False
    server_secret_file: str | None = None  # learner's secret key file
    server_public_file: str | None = None  # what workers use to reach the learner
    client_secret_file: str | None = None  # a worker's own key pair
    allowed_clients_dir: str | None = None  # public keys allowed to connect

    @model_validator(mode="after")
    def _files_when_enabled(self) -> "CurveConfig":
        if self.enabled:
            for key in ("server_secret_file", "server_public_file", "client_secret_file", "allowed_clients_dir"):
                if getattr(self, key) is None:
                    raise ValueError(f"transport.curve.{key} must be set when transport.curve.enabled is true")
        return self


class TransportConfig(_Section):
    """Trajectory stream (ZeroMQ) and weight broadcast (torch.distributed)."""

    bind_host: str | None = None  # default: the interface of torchrun's rendezvous
    port: int = Field(0, ge=0, le=65535)  # 0: pick a free port
    send_hwm: int = Field(256, ge=1)  # messages queued per worker before back-pressure
    recv_hwm: int = Field(1024, ge=1)
    queue_size: int = Field(4096, ge=1)  # learner's decoded-trajectory queue
    on_full: Literal["block", "drop"] = "block"
    max_message_mb: float = Field(64.0, gt=0)
    sync_every: int = Field(1, ge=1)  # learner steps between weight broadcasts
    bucket_mb: float = Field(256.0, gt=0)
    sync_timeout_s: float = Field(300.0, gt=0)
    collective_timeout_s: float = Field(600.0, gt=0)
    curve: CurveConfig = Field(default_factory=CurveConfig)


class TaskConfig(_Section):
    """Prompt source and reward."""

    name: Literal["sort", "math", "jsonl"] = "sort"
    path: str | None = None  # JSONL/Parquet prompt file
    prompt_field: str = "question"
    answer_field: str = "answer"
    system_prompt: str | None = None
    chat_template: bool = True
    reward: str | None = None  # "package.module:function" overrides the task's reward
    reward_timeout_s: float = Field(10.0, gt=0)
    reward_workers: int = Field(0, ge=0)  # 0: score inline, no process pool
    reward_on_failure: float = 0.0
    format_reward: float = 0.0
    params: dict[str, Any] = Field(default_factory=dict)


class TrainerConfig(_Section):
    max_steps: int = Field(100, ge=1)
    save_every: int = Field(0, ge=0)  # 0: only at the end
    log_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)


class RunConfig(_Section):
    """One run: every process reads the same object."""

    out_dir: str = "runs/default"
    seed: int = 0
    mode: Literal["async", "sync"] = "async"
    max_staleness: int = Field(2, ge=0)
    num_workers: int = Field(1, ge=1)  # local launch only: worker groups started without torchrun
    model: ModelConfig = Field(default_factory=ModelConfig)
    kv: KVConfig = Field(default_factory=KVConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)


def _parse_scalar(text: str) -> Any:
    """Parse an override's value as YAML so `lr=1e-3`, `x=true`, `ids=[1,2]` get their types."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, value, f"'{part}' to be a section, but it holds {child!r}", "command line")
        node = child
    node[parts[-1]] = value


def _raise_first(err: ValidationError, tree: dict[str, Any], source: str) -> None:
    errors = err.errors()
    first = errors[0]
    loc = tuple(first["loc"])
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        raise ConfigError(".".join(map(str, loc)) or "<root>", value, "no such key (unknown keys are not allowed)",
                          source) from None
    # A value matching no member of a union (e.g. `bool | "auto"`) fails once per member, each error's loc
    # ending in that member's tag ("bool", "literal['auto']"): report the key once, with every alternative.
    branches = [e for e in errors if len(e["loc"]) == len(loc) and tuple(e["loc"][:-1]) == loc[:-1]]
    if len(branches) > 1:
        alternatives = " or ".join(e["msg"].removeprefix("Input should be ") for e in branches)
        raise ConfigError(".".join(map(str, loc[:-1])), value, alternatives, source) from None
    raise ConfigError(".".join(map(str, loc)) or "<root>", value, first["msg"].removeprefix("Input should be "),
                      source) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file (optional) and apply `a.b.c=value` overrides; raise ConfigError when invalid."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError("<config file>", str(path), "an existing YAML file")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError("<config file>", str(path), f"valid YAML ({e})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("<config file>", str(path), "a YAML mapping at the top level")
        tree = loaded or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, None, "an override of the form key=value", "command line")
        key, _, raw = item.partition("=")
        _set_dotted(tree, key.strip(), _parse_scalar(raw))
    if overrides:
        source = f"{source} + command line"
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        _raise_first(err, tree, source)
    raise AssertionError("unreachable")


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as JSON (written next to every run's metrics)."""
    return json.dumps(cfg.model_dump(mode="json"), indent=2)
