"""The rollout engine: batched generation of n samples per prompt through the paged KV pool.

`GenerationEngine.generate(prompts, n, params)` runs steps until every sample is done:

- prefill step: every newly admitted prompt in one varlen forward (each prompt once); the last
  position's logits are sampled n times and the prompt's K/V forked into the n samples (full blocks
  shared, tail copied); the samples join the decode batch;
- decode step: every live sample in one batched forward of one token each. The batch's state (block
  tables, positions, last tokens) lives on the device (workers/decode_batch.py) and is updated with
  tensor ops; the slot mapping is computed on the device; the host only hands out a new block when a
  row crosses a block boundary. On CUDA the forward is replayed from a CUDA graph captured per
  batch-size bucket (workers/cuda_graphs.py; `kv.cuda_graphs`), else it runs eagerly;
- shared-prefix decode (`kv.shared_prefix`, Triton backend): the samples of a prompt share its full
  prompt blocks (the fork made them so), so a decode step may read each group's shared blocks once
  for all its live samples and only each sample's own blocks per row (kv/shared_prefix.py). "auto"
  takes that path on steps where some group has >= 2 live samples and >= 1 shared block, unless
  only the plain step has a captured graph for the batch (an eager step costs more than the shared
  path saves); "on" takes it whenever a group shares a block. It has its own set of graphs,
  captured for the call's number of prompts and samples per prompt n (they bound the groups and a
  group's live rows, which fix the kernel's grid), and recaptured only when those change;
- fused ops (`kv.fused_decode_ops`, on by default for CUDA): every forward of the engine runs the model's
  fused kernels (model/fused_decode.py); the engine has the model build its fused weight copies before
  any capture;
- catch-up step (only after a weight update): re-prefilled samples feed all their generated tokens
  in one varlen forward, then rejoin the decode batch.

After a forward, tokens are sampled for all rows at once and the stop-id test runs on the device; the
step's tokens, logprobs and stop flags then come back in one transfer, the only sync of the step.
The host appends them to the token history with one vectorised op and tests the length limit from
its own counts. Finished samples free their blocks at once and leave the decode batch; waiting
prompts enter as room appears (admission: workers/scheduler.py).

Tensor parallelism and weight updates share one control point per step: every rank of `tp_group`
all_reduces (MAX) `[has_live, is_done, new_weights, stop]` before each step. All ranks therefore leave on
the same step; when any rank saw new weights, all call `control.on_new_weights()` on that step, the
pool is invalidated and the live samples are prefilled again under the new weights (prompt once,
then their own tokens). If ranks disagree about being done (possible only when their inputs differ),
all leave together and the unfinished samples end with finish_reason "abort".
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from async_grpo.config import KVConfig, SamplingConfig
from async_grpo.kv.backend import graph_capturable, select_backend, shared_prefix_mode, step_attention
from async_grpo.kv.pool import KVPool, KVPoolStats
from async_grpo.kv.step_metadata import StepMetadata
from async_grpo.workers.cuda_graphs import DecodeGraphs
from async_grpo.workers.decode_batch import DecodeBatch
from async_grpo.workers.prefix_groups import group_slots
from async_grpo.workers.sampling import make_generator, sample_tokens
from async_grpo.workers.scheduler import Scheduler, StepPlan
from async_grpo.workers.sequence import Completion, Sequence, SequenceGroup
from async_grpo.workers.token_history import TokenHistory

__all__ = ["Completion", "DecodeControl", "GenerationEngine", "GenerationStats"]


class DecodeControl(Protocol):
    """The worker's hook into the decode loop for weight updates.

    Two optional members are honoured when present: `version` (int, the version of the weights the
    model holds; read at the start of `generate`, so weights loaded between calls are recorded), and
    `poll_stop() -> bool` (non-blocking: end the generation now; the unfinished samples end "abort"
    and `engine.stopped` is set). Both are agreed across tensor-parallel ranks like the weights flag.
    """

    def poll_new_weights(self) -> bool:
        """Non-blocking: are new weights waiting to be received?"""
        ...

    def on_new_weights(self) -> int:
        """Receive and load the new weights into the model (every TP rank, same step); return their version."""
        ...


@dataclass(slots=True)
class GenerationStats:
    """Counters of the last `generate` call."""

    prompt_tokens: int = 0  # distinct prompts' tokens
    generated_tokens: int = 0  # completion tokens returned
    prefill_tokens: int = 0  # tokens fed by prefill steps, re-prefills included
    steps: int = 0
    decode_steps: int = 0  # steps served by the device-side decode batch
    graph_steps: int = 0  # decode steps replayed from a CUDA graph
    shared_prefix_steps: int = 0  # decode steps that read shared prompt blocks once per group
    weight_updates: int = 0
    peak_blocks_in_use: int = 0


def fused_ops_enabled(setting: bool | str, device: torch.device) -> bool:
    """Resolve `kv.fused_decode_ops`: "auto" is on for a CUDA engine only (on the CPU its kernels would
    run in Triton's interpreter, or fall back to the same torch maths as the eager decoder)."""
    if setting == "auto":
        return device.type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"kv.fused_decode_ops = {setting!r}: expected true, false or 'auto'")


class GenerationEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cfg: KVConfig,
        device: torch.device | str,
        dtype: torch.dtype,
        tp_group: dist.ProcessGroup | None = None,
    ):
        self.model = model
        self.args = model.args
        self.device = torch.device(device)
        self.tp_group = tp_group
        self.backend = select_backend(kv_cfg.attention, self.device, kv_cfg.block_size)
        self.shared_prefix = shared_prefix_mode(kv_cfg.shared_prefix, self.backend)  # "on" | "auto" | "off"
        self.fused_ops = fused_ops_enabled(kv_cfg.fused_decode_ops, self.device)
        if self.fused_ops:
            # Before any graph capture: the graphs read the fused weight copies in place.
            model.prepare_fused_decode()
        self.pool = KVPool(
            kv_cfg, model.num_layers, model.num_kv_heads_local, model.head_dim, self.device, dtype
        )
        self.policy_version = 0  # of the weights the model holds; recorded in every new sample
        self.stopped = False  # the last generate ended early on control.poll_stop()
        self.last_stats = GenerationStats()
        # The control tensor must live where the group's backend can reduce it.
        self._control_device = torch.device("cpu")
        if tp_group is not None and dist.get_backend(tp_group) == "nccl":
            self._control_device = self.device
        # A row never holds more blocks than a sequence of the model's longest context, nor the whole pool.
        max_blocks = min(-(-self.args.max_position_embeddings // self.pool.block_size), self.pool.num_blocks)
        self.decode_batch = DecodeBatch(self.pool, max_blocks, kv_cfg.cuda_graph_max_rows, self.device)
        self.graphs: DecodeGraphs | None = None  # plain decode step
        self.shared_graphs: DecodeGraphs | None = None  # shared-prefix decode step
        self._shared_graphs_for: tuple[int, int] | None = None  # (prompts, n) they were last captured for
        # The current call's prompts and samples per prompt: they bound the groups and a group's live rows.
        self._num_prompts, self._group_size = 1, 1
        self._graphs_enabled = self._graphs_apply(kv_cfg)
        if self._graphs_enabled:
            self.graphs = DecodeGraphs(self._graph_forward, kv_cfg.cuda_graph_max_rows, self.device)
            self._capture_graphs()

    def _graphs_apply(self, kv_cfg: KVConfig) -> bool:
        """CUDA graphs need CUDA, a capturable attention backend, and no collectives inside the step."""
        tp_size = 1 if self.tp_group is None else dist.get_world_size(self.tp_group)
        return kv_cfg.cuda_graphs and self.device.type == "cuda" and graph_capturable(self.backend) and tp_size == 1

    def _capture_graphs(self) -> None:
        assert self.graphs is not None and self.decode_batch.num_rows == 0
        self.shared_graphs, self._shared_graphs_for = None, None  # they read the same buffers: recaptured later
        with torch.inference_mode():
            if not self.graphs.capture():
                self.graphs = None

    def _capture_shared_graphs(self) -> None:
        """Shared-prefix graphs for the current call's prompts and n (same memory pool as the plain ones)."""
        assert self.graphs is not None and self.decode_batch.num_rows == 0
        self._shared_graphs_for = (self._num_prompts, self._group_size)
        self.shared_graphs = DecodeGraphs(
            lambda rows: self._graph_forward(rows, shared=True), self.graphs.buckets[-1], self.device,
            mempool=self.graphs.mempool,
        )
        # Capture reads the buffers: no rows, no groups, so every bucket's programs do nothing out of bounds.
        self.decode_batch.refresh_prefix_groups(None, self._group_size)
        with torch.inference_mode():
            if not self.shared_graphs.capture():
                self.shared_graphs = None

    def _may_share_prefix(self, prompts: list[list[int]], n: int) -> bool:
        """Whether a decode step of this call can take the shared-prefix path at all."""
        if self.shared_prefix == "off" or all(len(p) < self.pool.block_size for p in prompts):
            return False
        return n >= 2 or self.shared_prefix == "on"

    # ---- public ------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        params: SamplingConfig,
        seed: int | None = None,
        control: DecodeControl | None = None,
    ) -> list[list[Completion]]:
        """n completions for each prompt, in prompt order."""
        # Slots are reused as samples finish and double when short, so start no larger than a usual batch.
        history = TokenHistory(params.max_new_tokens, capacity=max(1, min(len(prompts) * n, 512)))
        groups = self._make_groups(prompts, n, params)
        scheduler = Scheduler(self.pool, groups, params.max_new_tokens)
        stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts))
        self.pool.invalidate()
        self.pool.reset_peak()
        self.decode_batch.clear()
        if self.decode_batch.reserve(len(prompts) * n) and self.graphs is not None:
            self._capture_graphs()  # the buffers moved: graphs must read the new ones
        self._num_prompts, self._group_size = max(1, len(prompts)), n
        wants_shared_graphs = self._graphs_enabled and self.graphs is not None and self._may_share_prefix(prompts, n)
        if wants_shared_graphs and self._shared_graphs_for != (self._num_prompts, n):
            self._capture_shared_graphs()
        self.stopped = False
        known_version = getattr(control, "version", None)
        if isinstance(known_version, int) and known_version >= 0:
            self.policy_version = known_version
        poll_stop = getattr(control, "poll_stop", None)
        generator = make_generator(self._agreed_seed(seed), self.device)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.args.eos_token_ids))
        stop_tensor = torch.tensor(sorted(stop_ids), dtype=torch.long, device=self.device)  # [num_stop_ids]
        step = _StepContext(scheduler, history, params, generator, stop_tensor, stats)

        while True:
            has_live = scheduler.has_unfinished()
            saw_weights = control.poll_new_weights() if control is not None else False
            saw_stop = poll_stop() if poll_stop is not None else False
            any_live, any_done, new_weights, stop = self._agree(has_live, not has_live, saw_weights, saw_stop)
            if new_weights:
                if control is None:
                    raise RuntimeError(
                        "a tensor-parallel peer received new weights, but this rank has no DecodeControl"
                    )
                self.policy_version = int(control.on_new_weights())
                scheduler.invalidate()
                self.decode_batch.clear()
                stats.weight_updates += 1
            if not any_live:
                break
            if stop:
                scheduler.abort_all()
                self.decode_batch.clear()
                self.stopped = True
                break
            if any_done:
                # Peers are done while this rank is not (or the reverse): leave together, never diverge.
                scheduler.abort_all()
                self.decode_batch.clear()
                break
            plan = scheduler.next_step()
            if plan is not None:
                self._run_varlen_step(plan, step)
            else:
                assert self.decode_batch.num_rows > 0, "an unfinished scheduler with no plan has rows to decode"
                self._run_decode_step(step)
            stats.steps += 1

        stats.peak_blocks_in_use = self.pool.stats().peak_blocks_in_use
        stats.generated_tokens = sum(s.num_generated for g in groups for s in g.samples)
        self.last_stats = stats
        return [self._completions(g) for g in groups]

    def pool_stats(self) -> KVPoolStats:
        return self.pool.stats()

    # ---- decode step (device-side batch) ------------------------------------------------------

    def _run_decode_step(self, step: "_StepContext") -> None:
        batch = self.decode_batch
        rows = batch.num_rows
        batch.grow_blocks()
        plain_bucket = self.graphs.bucket_for(rows) if self.graphs is not None else None
        shared_bucket = self.shared_graphs.bucket_for(rows) if self.shared_graphs is not None else None
        shared = self._takes_shared_path(plain_bucket is not None, shared_bucket is not None)
        graphs, bucket = (self.shared_graphs, shared_bucket) if shared else (self.graphs, plain_bucket)
        if shared:
            # Before the replay (the graph reads the buffers): rows past the live ones are the bucket's padding.
            batch.refresh_prefix_groups(rows if bucket is None else bucket, self._group_size)
            step.stats.shared_prefix_steps += 1
        if bucket is not None:
            assert graphs is not None
            logits = graphs.replay(bucket)[:rows]  # [R, V]
            step.stats.graph_steps += 1
        else:
            logits = self._decode_forward(rows, batch.max_context_len(), shared)  # [R, V]
        tokens, logprobs = sample_tokens(logits, step.params, step.generator)  # [R], [R]
        is_stop = torch.isin(tokens, step.stop_tensor)  # [R]
        # fp64 holds int token ids, fp32 logprobs and flags exactly: one transfer for all three.
        host = torch.stack([tokens.double(), logprobs.double(), is_stop.double()])  # [3, R]
        batch.advance(tokens)  # queued before the sync below, so it overlaps the copy
        finished = self._record(batch.seqs, batch.slots, host.cpu().numpy(), step)
        batch.remove(finished)
        step.stats.decode_steps += 1

    def _takes_shared_path(self, plain_graph: bool, shared_graph: bool) -> bool:
        """Whether this decode step reads shared prompt blocks once per group (see the module docstring)."""
        if self.shared_prefix == "off":
            return False
        if self.shared_prefix == "on":
            return self.decode_batch.shares_prefix(min_rows=1)
        # auto: a sharing group, and no eager step where the plain step would replay a graph.
        return self.decode_batch.shares_prefix(min_rows=2) and (shared_graph or not plain_graph)

    def _decode_forward(self, rows: int, max_context_len: int, shared: bool = False) -> torch.Tensor:
        """Logits [rows, V] of the decode batch's first `rows` rows (rows past num_rows are padding)."""
        batch = self.decode_batch
        groups = None
        if shared:
            slots = group_slots(rows, self._num_prompts, self._group_size)
            groups = batch.prefix_groups(rows, slots, self._group_size)
        meta = batch.metadata(rows, max_context_len, groups)
        attn = step_attention(self.backend, self.pool, meta)
        positions = batch.positions[:rows].clamp_min(0)  # [rows]; padding rows sit at position 0
        return self.model.forward_paged(batch.last_tokens[:rows], positions, attn, fused_ops=self.fused_ops)

    def _graph_forward(self, rows: int, shared: bool = False) -> torch.Tensor:
        # The fused kernels bound their work by the block tables' width, not by this host-side maximum.
        return self._decode_forward(rows, self.decode_batch.max_blocks * self.pool.block_size, shared)

    # ---- prefill and catch-up steps (host-built varlen metadata) ------------------------------

    def _run_varlen_step(self, plan: StepPlan, step: "_StepContext") -> None:
        logits = self._forward(plan)  # [len(entries), V]
        if plan.is_prefill:
            step.stats.prefill_tokens += sum(len(e.tokens) for e in plan.entries)

        # Which logits row each sampled token comes from, and the sample it extends.
        rows: list[int] = []
        targets: list[Sequence] = []
        for row, entry in enumerate(plan.entries):
            if entry.seq is not None:  # catch-up: the sample's next token
                rows.append(row)
                targets.append(entry.seq)
            elif not entry.group.samples:  # a fresh prompt: its n samples' first tokens
                group = entry.group
                for _ in range(group.n):
                    seq = Sequence(group, len(group.samples), self.policy_version, step.history, step.history.open())
                    group.samples.append(seq)
                    rows.append(row)
                    targets.append(seq)
        ready: list[Sequence] = []
        if rows:
            if len(rows) != logits.shape[0] or rows != list(range(len(rows))):
                logits = logits.index_select(0, torch.tensor(rows, device=logits.device))  # [R, V]
            tokens, logprobs = sample_tokens(logits, step.params, step.generator)  # [R], [R]
            is_stop = torch.isin(tokens, step.stop_tensor)  # [R]
            host = torch.stack([tokens.double(), logprobs.double(), is_stop.double()]).cpu().numpy()  # [3, R]
            slots = np.fromiter((s.slot for s in targets), dtype=np.int64, count=len(targets))
            finished = self._record(targets, slots, host, step)
            # Catch-up samples already hold their K/V; fresh ones get theirs from the fork below.
            ready = [s for s, fin in zip(targets, finished.tolist()) if not fin and s.kv is not None]
        for entry in plan.entries:
            if entry.seq is None:
                ready.extend(step.scheduler.fork_prompt(entry.group))
        if ready:
            slots = np.fromiter((s.slot for s in ready), dtype=np.int64, count=len(ready))
            self.decode_batch.add(ready, step.history.last_tokens(slots))

    def _forward(self, plan: StepPlan) -> torch.Tensor:
        slots, tables, ctx_lens, ids, positions, last_rows = [], [], [], [], [], []
        for entry in plan.entries:
            start = self.pool.seq_len(entry.kv)
            slots.append(self.pool.append_slots(entry.kv, len(entry.tokens)))
            tables.append(self.pool.block_table(entry.kv))
            ctx_lens.append(start + len(entry.tokens))
            ids.extend(entry.tokens)
            positions.extend(range(start, start + len(entry.tokens)))
            last_rows.append(len(ids) - 1)
        meta = StepMetadata.build(slots, tables, ctx_lens, self.pool.block_size, self.device)
        t = len(ids)
        packed = torch.tensor(ids + positions + last_rows, dtype=torch.long).to(self.device, non_blocking=True)
        attn = step_attention(self.backend, self.pool, meta)
        # packed: [T input ids | T positions | R logits rows]
        return self.model.forward_paged(
            packed[:t], packed[t : 2 * t], attn, packed[2 * t :], fused_ops=self.fused_ops
        )  # [R, V]

    # ---- bookkeeping shared by both kinds of step ---------------------------------------------

    def _record(self, seqs: list[Sequence], slots: np.ndarray, host: np.ndarray, step: "_StepContext") -> np.ndarray:
        """Append one sampled token per sample (host [3, R]: tokens, logprobs, stop flags); finish and
        release the samples that stopped or reached max_new_tokens. Returns the finished mask [R]."""
        step.history.append(slots, host[0].astype(np.int64), host[1].astype(np.float32))
        stopped = host[2] != 0
        finished = stopped | (step.history.counts[slots] >= step.params.max_new_tokens)
        for i in np.flatnonzero(finished).tolist():
            seq = seqs[i]
            seq.finish("stop" if stopped[i] else "length")
            step.scheduler.release(seq)
        return finished

    # ---- tensor-parallel agreement -----------------------------------------------------------

    def _agree(self, has_live: bool, is_done: bool, new_weights: bool, stop: bool) -> tuple[bool, bool, bool, bool]:
        """(any rank live, any rank done while another is live, any rank saw new weights, any asked to stop)."""
        if self.tp_group is None:
            return has_live, False, new_weights, stop
        flags = torch.tensor(
            [int(has_live), int(is_done), int(new_weights), int(stop)], device=self._control_device
        )  # [4]
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.tp_group)
        any_live, any_done, any_new, any_stop = (bool(x) for x in flags.tolist())
        return any_live, any_live and any_done, any_new, any_stop

    def _agreed_seed(self, seed: int | None) -> int | None:
        """Every TP rank must draw the same tokens: an unseeded run agrees on one random seed."""
        if seed is not None or self.tp_group is None:
            return seed
        mine = torch.tensor([random.SystemRandom().randrange(2**62)], device=self._control_device)  # [1]
        dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.tp_group)
        return int(mine.item())

    # ---- input and output --------------------------------------------------------------------

    def _make_groups(self, prompts: list[list[int]], n: int, params: SamplingConfig) -> list[SequenceGroup]:
        if n < 1:
            raise ValueError(f"n = {n}: expected at least 1 sample per prompt")
        max_pos = self.args.max_position_embeddings
        vocab = self.args.vocab_size
        groups = []
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty: expected at least one token id")
            if len(prompt) + params.max_new_tokens > max_pos:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens; with max_new_tokens = {params.max_new_tokens} that is "
                    f"{len(prompt) + params.max_new_tokens}, beyond the model's {max_pos} positions"
                )
            bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab)]
            if bad:
                raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {vocab})")
            groups.append(SequenceGroup(index=i, prompt_ids=list(prompt), n=n))
        return groups

    def _completions(self, group: SequenceGroup) -> list[Completion]:
        if not group.samples:  # aborted before its prompt ever ran
            return [Completion([], [], "abort", self.policy_version) for _ in range(group.n)]
        return [s.to_completion() for s in group.samples]


@dataclass(slots=True)
class _StepContext:
    """What every step of one `generate` call needs."""

    scheduler: Scheduler
    history: TokenHistory
    params: SamplingConfig
    generator: torch.Generator
    stop_tensor: torch.Tensor
    stats: GenerationStats
