"""Megatron-style tensor-parallel layers for the rollout workers' decoder.

A worker group of `tp_size` ranks holds one copy of the policy split across its ranks:
- `ColumnParallelLinear` splits the output features (q/k/v by whole heads, gate/up by columns); its
  input is replicated and its output stays local, so it needs no communication.
- `RowParallelLinear` splits the input features (o_proj, down_proj) and all-reduces the partial sums.
- `VocabParallelEmbedding` splits the vocabulary rows; each rank embeds the ids it owns, the rest
  are zero, and one all-reduce completes every row.
- `vocab_parallel_logits` multiplies by this rank's vocabulary rows and all-gathers, so every rank
  sees the full logits and samples the same tokens.

Every parameter keeps its Hugging Face name and each layer knows how to cut its shard out of a full
tensor (`shard_full`) and how to rebuild the full tensor from the shards (`gather_full`), so weight
broadcasts and checkpoints always move full, HF-named tensors. With `tp_group=None` (or a group of
one) the layers are plain linear/embedding layers: no collective, no copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TPGroup:
    """A tensor-parallel process group with its rank and size resolved once."""

    group: dist.ProcessGroup | None
    rank: int
    size: int

    @classmethod
    def of(cls, group: dist.ProcessGroup | None) -> "TPGroup":
        if group is None:
            return cls(None, 0, 1)
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def split(self, total: int, what: str) -> int:
        """The per-rank share of `total` items; they must divide evenly."""
        if total % self.size != 0:
            raise ValueError(f"{what} = {total} is not divisible by tp_size = {self.size}")
        return total // self.size

    def vocab_range(self, vocab_size: int) -> tuple[int, int]:
        """This rank's [start, end) of the vocabulary: ceil-sized shards, the last one may be shorter."""
        per_rank = -(-vocab_size // self.size)
        start, end = self.rank * per_rank, min(vocab_size, (self.rank + 1) * per_rank)
        if end <= start:
            raise ValueError(f"vocab_size = {vocab_size} is too small to split over tp_size = {self.size}")
        return start, end


NO_TP = TPGroup(None, 0, 1)


def all_reduce_sum(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return dist_autograd.all_reduce(x, group=tp.group)
    dist.all_reduce(x, group=tp.group)
    return x


def all_gather_ragged(x: torch.Tensor, tp: TPGroup, dim: int, full_size: int) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` when shards are ceil-sized (the last may be shorter)."""
    if tp.size == 1:
        return x
    per_rank = -(-full_size // tp.size)
    dim = dim % x.dim()
    pad = per_rank - x.shape[dim]
    if pad:
        # F.pad counts dimensions from the last one backwards, two entries per dimension.
        x = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, pad])
    x = x.contiguous()
    if torch.is_grad_enabled() and x.requires_grad:
        parts = list(dist_autograd.all_gather(x, group=tp.group))
    else:
        parts = [torch.empty_like(x) for _ in range(tp.size)]
        dist.all_gather(parts, x, group=tp.group)
    return torch.cat(parts, dim=dim).narrow(dim, 0, full_size)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's rows (output features) split across ranks; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup = NO_TP,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.tp, self.in_features, self.out_features = tp, in_features, out_features
        local = tp.split(out_features, "output features")
        self.weight = nn.Parameter(torch.empty(local, in_features, device=device, dtype=dtype))  # [out/tp, in]
        self.bias = nn.Parameter(torch.empty(local, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def shard_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        local = self.weight.shape[0]
        return full.narrow(0, self.tp.rank * local, local)

    def gather_full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        return all_gather_ragged(local, self.tp, 0, self.out_features)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, then + b: W's columns (input features) split across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup = NO_TP,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.tp, self.in_features, self.out_features = tp, in_features, out_features
        local = tp.split(in_features, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, local, device=device, dtype=dtype))  # [out, in/tp]
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        # The bias joins after the reduction, else it would be added tp_size times.
        y = all_reduce_sum(F.linear(x, self.weight), self.tp)
        return y if self.bias is None else y + self.bias

    def shard_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        if name == "bias":
            return full
        local = self.weight.shape[1]
        return full.narrow(1, self.tp.rank * local, local)

    def gather_full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        return local if name == "bias" else all_gather_ragged(local, self.tp, 1, self.in_features)


class VocabParallelEmbedding(nn.Module):
    """Embedding with its vocabulary rows split across ranks; every rank returns the full embeddings."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = NO_TP,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.vocab_start, self.vocab_end = tp.vocab_range(vocab_size)
        rows = self.vocab_end - self.vocab_start
        self.weight = nn.Parameter(torch.empty(rows, hidden_size, device=device, dtype=dtype))  # [V/tp, H]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        owned = (ids >= self.vocab_start) & (ids < self.vocab_end)
        local_ids = torch.where(owned, ids - self.vocab_start, 0)
        emb = F.embedding(local_ids, self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)  # [..., H]
        return all_reduce_sum(emb, self.tp)

    def shard_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return full[self.vocab_start:self.vocab_end]

    def gather_full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        return all_gather_ragged(local, self.tp, 0, self.vocab_size)


def vocab_parallel_logits(hidden: torch.Tensor, weight: torch.Tensor, tp: TPGroup, vocab_size: int) -> torch.Tensor:
    """hidden [..., H] x this rank's vocabulary rows [V/tp, H] -> full logits [..., V] on every rank."""
    return all_gather_ragged(F.linear(hidden, weight), tp, -1, vocab_size)


class ParallelLMHead(VocabParallelEmbedding):
    """The untied output projection: same vocabulary split as the embedding, logits all-gathered."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return vocab_parallel_logits(hidden, self.weight, self.tp, self.vocab_size)


SHARDED_LAYERS = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)
