"""Many trajectories as columns: what one message decodes to and what the learner's queue holds.

A `TrajectoryBatch` keeps a message's tensors whole (its distinct prompts, then its completions, in
one int32 tensor; the behaviour logprobs in another) with each row's start and length, and one numpy
column per scalar field. Nothing per trajectory is built when a message arrives: the receiving thread
hands the batch over as it is, the queue cuts it by rows (`rows`, `select`: column slices, no tensor
copy), and the learner asks for `TrajectoryView`s only where it reads one trajectory at a time
(batching, metrics). A worker builds a batch straight from a group's token lists (`from_group`), so
encoding it costs no per-trajectory Python either.

Rows may be any subset of the tensors (after `select`): starts are absolute offsets into the shared
tensors, so cutting never moves token data. A `packed` batch (a decoded message, a worker's group)
holds exactly its rows' data in order: it keeps its scalars in the wire's column block
(wire_columns.py), reads its columns as views of that block when first asked, and is sent as it is.
Its columns are to be read, not written: the block is what gets sent. A decoded message also keeps
its two tensor frames as numpy arrays: its tensors are made from them when first read (one object
fewer per frame for the receiving thread to build and for the garbage collector to track while it
waits in the queue), and a re-encode sends the arrays as they are.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Sequence

import numpy as np
import torch

from async_grpo.transport.trajectory import FINISH_REASONS
from async_grpo.transport.wire_columns import column_views, pack_columns, prompts_in

FINISH_CODES = {reason: code for code, reason in enumerate(FINISH_REASONS)}

# Per-row columns (cut by select), what every cut shares, and what a packed batch derives when first read.
_ROW_COLUMNS = (
    "completion_lens", "prompt_index", "reward", "advantage", "group_id", "sample_index", "policy_version",
    "worker_id", "finish_code", "extra_index",
)
_SHARED = ("prompt_ids", "prompt_lens", "completion_ids", "behaviour_logprobs", "extras", "_prompt_views")
_DERIVED = frozenset(_ROW_COLUMNS) | {"prompt_ids", "completion_ids", "prompt_lens", "_prompt_views"}
_TENSORS = frozenset({"token_ids", "behaviour_logprobs"})  # made from `_arrays` when first read


class TrajectoryBatch:
    """K trajectories as columns over shared tensors (see the module docstring)."""

    __slots__ = (
        "token_ids", "prompt_ids", "_prompt_starts", "prompt_lens", "completion_ids", "behaviour_logprobs",
        "_completion_starts", *_ROW_COLUMNS, "extras", "packed", "wire_columns", "_prompt_views", "_count",
        "_blocks", "_arrays",
    )

    @classmethod
    def from_columns(
        cls, token_ids: torch.Tensor | np.ndarray, behaviour_logprobs: torch.Tensor | np.ndarray, wire_columns: Any,
        count: int, extras: list[dict[str, float]], blocks: tuple | None = None,
    ) -> "TrajectoryBatch":
        """A packed batch: `token_ids` [sum of prompt lengths + sum of completion lengths] int32 (the
        distinct prompts, then the completions), `behaviour_logprobs` [sum of completion lengths] fp32, and
        a column block (wire_columns.py) of `count` rows with its blocks' views if already made. The named
        columns and the prompt/completion views are made when first read, so a receiving thread does not
        pay for them; so are the two tensors when given as numpy arrays (a decoded message's frames)."""
        batch = cls.__new__(cls)
        if type(token_ids) is np.ndarray:
            batch._arrays = (token_ids, behaviour_logprobs)
        else:
            batch.token_ids, batch.behaviour_logprobs = token_ids, behaviour_logprobs
            batch._arrays = None
        batch.extras, batch.packed, batch.wire_columns = extras, True, wire_columns
        batch._count = count
        batch._blocks = blocks
        batch._prompt_starts = batch._completion_starts = None
        return batch

    def __getattr__(self, name: str):
        # Reached only for a slot never set: what a packed batch derives from its arrays and its block,
        # on first read.
        if name in _TENSORS and object.__getattribute__(self, "_arrays") is not None:
            tokens, logprobs = self._arrays
            self.token_ids, self.behaviour_logprobs = torch.from_numpy(tokens), torch.from_numpy(logprobs)
            return object.__getattribute__(self, name)
        data = object.__getattribute__(self, "wire_columns")
        if data is None or name not in _DERIVED:
            raise AttributeError(f"'TrajectoryBatch' object has no attribute {name!r}")
        k = self._count
        p = prompts_in(memoryview(data).nbytes, k)
        floats, ints, index, codes = self._blocks or column_views(data, k, p)
        self.reward, self.advantage = floats
        self.group_id, self.sample_index, self.policy_version, self.worker_id = ints
        self.completion_lens, self.prompt_lens = index[:k], index[k : k + p]
        self.prompt_index, self.extra_index = index[k + p : 2 * k + p], index[2 * k + p :]
        self.finish_code = codes
        prompt_total = len(self.token_ids) - len(self.behaviour_logprobs)
        self.prompt_ids, self.completion_ids = self.token_ids[:prompt_total], self.token_ids[prompt_total:]
        # One tensor per distinct prompt, made on first use and shared by its rows' views, so a re-encode
        # (learner rank 0 to its peers) still sends each prompt once.
        self._prompt_views = [None] * p
        self._blocks = None
        return object.__getattribute__(self, name)

    def __len__(self) -> int:
        return self._count

    @classmethod
    def from_group(
        cls, prompt_ids: Sequence[int] | torch.Tensor, completions: Sequence[Sequence[int]],
        logprobs: Sequence[Sequence[float]], rewards: Sequence[float], advantages: Sequence[float], group_id: int,
        sample_indices: Sequence[int], policy_versions: Sequence[int], finish_reasons: Sequence[str], worker_id: int,
        extra: dict[str, float] | None = None,
    ) -> "TrajectoryBatch":
        """The samples of one prompt: one conversion per field for the whole group, not one per sample."""
        count = len(completions)
        if not (len(logprobs) == len(rewards) == len(advantages) == len(sample_indices) == len(policy_versions)
                == len(finish_reasons) == count):
            raise ValueError(
                f"TrajectoryBatch.from_group: {count} completions but {len(logprobs)} logprob lists, {len(rewards)} "
                f"rewards, {len(advantages)} advantages, {len(sample_indices)} sample indices, {len(policy_versions)} "
                f"versions, {len(finish_reasons)} finish reasons: expected one of each per completion"
            )
        lens = np.fromiter(map(len, completions), dtype=np.int64, count=count)  # [K]
        if not np.array_equal(lens, np.fromiter(map(len, logprobs), dtype=np.int64, count=count)):
            raise ValueError("TrajectoryBatch.from_group: a completion's logprobs differ in length from its tokens")
        unknown = set(finish_reasons) - FINISH_CODES.keys()
        if unknown:
            raise ValueError(f"TrajectoryBatch.from_group: finish reasons {sorted(unknown)}: expected {FINISH_REASONS}")
        # Caught here, at the worker, rather than as a rejected message at the learner.
        for name, values in (("reward", rewards), ("advantage", advantages), ("extra", list((extra or {}).values()))):
            if not np.isfinite(np.asarray(values, dtype=np.float64)).all():
                raise ValueError(f"TrajectoryBatch.from_group: {name} values {list(values)}: expected finite numbers")
        if min(sample_indices, default=0) < 0 or min(policy_versions, default=0) < 0 or min(group_id, worker_id) < 0:
            raise ValueError(f"TrajectoryBatch.from_group: group_id={group_id}, worker_id={worker_id}, sample indices "
                             f"{list(sample_indices)}, versions {list(policy_versions)}: expected non-negative integers")
        prompt = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
        data = pack_columns(  # [61 K + 4] the wire's column block, built once
            rewards, advantages, group_id, sample_indices, policy_versions, worker_id, lens, [len(prompt)], 0, 0,
            [FINISH_CODES[r] for r in finish_reasons])
        return cls.from_columns(
            torch.tensor(list(chain(prompt, *completions)), dtype=torch.int32),  # [P + sum C]
            torch.tensor(list(chain.from_iterable(logprobs)), dtype=torch.float32),  # [sum C]
            data, count, [dict(extra or {})])

    @classmethod
    def concat(cls, batches: Sequence["TrajectoryBatch"]) -> "TrajectoryBatch":
        """One packed batch of all rows of `batches`, in order (a worker's whole generation batch as one
        message): one copy of the tokens and logprobs, prompt and extra indices shifted to the joined lists."""
        if not batches:
            raise ValueError("TrajectoryBatch.concat() got no batches: expected at least one")
        if len(batches) == 1 and batches[0].packed:
            return batches[0]
        # Each batch's prompts that its rows use (a cut batch may share prompts no row of it needs).
        used, prompt_index = zip(*(
            (np.arange(len(b.prompt_lens)), b.prompt_index) if b.packed else np.unique(b.prompt_index, return_inverse=True)
            for b in batches))
        prompt_base = np.cumsum([0] + [len(u) for u in used[:-1]])  # [B] first joined prompt of each batch
        extra_base = np.cumsum([0] + [len(b.extras) for b in batches[:-1]])  # [B] first extra map of each
        prompts = [b.prompt_tensor(int(i)) for b, u in zip(batches, used) for i in u]
        completions = [b.completion_ids if b.packed else torch.cat([v.completion_ids for v in b.views()])
                       for b in batches]
        logprobs = [b.behaviour_logprobs if b.packed else torch.cat([v.behaviour_logprobs for v in b.views()])
                    for b in batches]
        cat = np.concatenate
        data = pack_columns(  # [61 K + 4 P]
            cat([b.reward for b in batches]), cat([b.advantage for b in batches]), cat([b.group_id for b in batches]),
            cat([b.sample_index for b in batches]), cat([b.policy_version for b in batches]),
            cat([b.worker_id for b in batches]), cat([b.completion_lens for b in batches]),
            cat([b.prompt_lens[u] for b, u in zip(batches, used)]),
            cat([index + base for index, base in zip(prompt_index, prompt_base)]),
            cat([b.extra_index + base for b, base in zip(batches, extra_base)]), cat([b.finish_code for b in batches]))
        return cls.from_columns(
            torch.cat([*prompts, *completions]), torch.cat(logprobs),  # [sum P + sum C], [sum C]
            data, sum(map(len, batches)), [e for b in batches for e in b.extras])

    def rows(self, start: int, stop: int) -> "TrajectoryBatch":
        """Rows [start, stop): column slices over the same tensors."""
        return self.select(slice(start, stop))

    def select(self, rows: slice | np.ndarray) -> "TrajectoryBatch":
        """The given rows (a slice, a bool mask or indices), in that order, over the same tensors."""
        out = TrajectoryBatch.__new__(TrajectoryBatch)
        out._completion_starts = self.completion_starts[rows]
        out._prompt_starts = self.prompt_starts
        for name in _ROW_COLUMNS:
            setattr(out, name, getattr(self, name)[rows])
        for name in _SHARED:
            setattr(out, name, getattr(self, name))
        out.packed = False
        out.token_ids = out.wire_columns = out._blocks = out._arrays = None
        out._count = len(out.reward)
        return out

    @property
    def completion_starts(self) -> np.ndarray:  # [K] int64, offsets into completion_ids
        if self._completion_starts is None:
            self._completion_starts = np.cumsum(self.completion_lens, dtype=np.int64) - self.completion_lens
        return self._completion_starts

    @property
    def prompt_starts(self) -> np.ndarray:  # [num_prompts] int64, offsets into prompt_ids
        if self._prompt_starts is None:
            self._prompt_starts = np.cumsum(self.prompt_lens, dtype=np.int64) - self.prompt_lens
        return self._prompt_starts

    def frame_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """A packed batch's tokens and logprobs as numpy arrays (views, no copy): its two tensor frames."""
        if self._arrays is None:  # kept: a push sizes the batch, then encodes it
            self._arrays = (self.token_ids.numpy(), self.behaviour_logprobs.numpy())
        return self._arrays

    def view(self, row: int) -> "TrajectoryView":
        return TrajectoryView(self, row)

    def views(self) -> list["TrajectoryView"]:
        """One lazy view per row, in order."""
        if self._count == 1:  # a trajectory streamed on its own: a third of the comprehension's cost
            return [TrajectoryView(self, 0)]
        return [TrajectoryView(self, row) for row in range(self._count)]

    def prompt_tensor(self, index: int) -> torch.Tensor:
        cached = self._prompt_views[index]
        if cached is None:
            start = int(self.prompt_starts[index])
            cached = self._prompt_views[index] = self.prompt_ids[start : start + int(self.prompt_lens[index])]
        return cached


class TrajectoryView:
    """One row of a TrajectoryBatch with the attributes of a `Trajectory`, read when asked.

    The tensors are views of the batch's tensors (made once, then kept); the scalars are Python numbers.
    """

    __slots__ = ("batch", "row", "_completion", "_logprobs")

    def __init__(self, batch: TrajectoryBatch, row: int):
        self.batch, self.row = batch, row
        self._completion: torch.Tensor | None = None
        self._logprobs: torch.Tensor | None = None

    @property
    def prompt_ids(self) -> torch.Tensor:  # [P] int32
        return self.batch.prompt_tensor(int(self.batch.prompt_index[self.row]))

    @property
    def completion_ids(self) -> torch.Tensor:  # [C] int32
        if self._completion is None:
            start = int(self.batch.completion_starts[self.row])
            self._completion = self.batch.completion_ids[start : start + int(self.batch.completion_lens[self.row])]
        return self._completion

    @property
    def behaviour_logprobs(self) -> torch.Tensor:  # [C] float32
        if self._logprobs is None:
            start = int(self.batch.completion_starts[self.row])
            self._logprobs = self.batch.behaviour_logprobs[start : start + int(self.batch.completion_lens[self.row])]
        return self._logprobs

    @property
    def reward(self) -> float:
        return float(self.batch.reward[self.row])

    @property
    def advantage(self) -> float:
        return float(self.batch.advantage[self.row])

    @property
    def group_id(self) -> int:
        return int(self.batch.group_id[self.row])

    @property
    def sample_index(self) -> int:
        return int(self.batch.sample_index[self.row])

    @property
    def policy_version(self) -> int:
        return int(self.batch.policy_version[self.row])

    @property
    def worker_id(self) -> int:
        return int(self.batch.worker_id[self.row])

    @property
    def finish_reason(self) -> str:
        return FINISH_REASONS[int(self.batch.finish_code[self.row])]

    @property
    def extra(self) -> dict[str, float]:
        return self.batch.extras[int(self.batch.extra_index[self.row])]

    @property
    def num_tokens(self) -> int:
        """Prompt plus completion length: what the learner's token budget counts."""
        return int(self.batch.prompt_lens[self.batch.prompt_index[self.row]] + self.batch.completion_lens[self.row])

    def __repr__(self) -> str:
        return (f"TrajectoryView(row={self.row}, group_id={self.group_id}, sample_index={self.sample_index}, "
                f"policy_version={self.policy_version}, reward={self.reward}, tokens={self.num_tokens})")
