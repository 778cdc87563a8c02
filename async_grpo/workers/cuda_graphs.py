"""CUDA graphs for the rollout engine's decode step: hundreds of kernel launches replayed as one.

An eager decode step of a 24-layer model launches ~750 small kernels; on a fast GPU the host cannot
issue them as fast as the GPU runs them, so the step is CPU-bound. The decode forward (metadata from
the decode batch's buffers, every layer with its paged attention, the lm_head) has fixed shapes for a
fixed number of rows, so it is captured once per batch-size bucket (1, 2, 4, ..., max_rows) and
replayed: R live rows replay the smallest bucket >= R, whose extra rows are padding (position -1: no
K/V written, nothing attended) and whose logits are ignored.

Why replay is valid:
- the graphs read the decode batch's static buffers (block tables, positions, last tokens) and the
  model's parameters in place. Weight updates copy into the same tensors (`load_full_state_dict`),
  so they need no recapture; reallocated decode buffers do (the engine recaptures then).
- capture runs while the decode batch is empty (every row padding), so warm-up and capture never
  write the KV pool.
- sampling stays outside the graph: its parameters change per call and it is a dozen launches.

The engine keeps one `DecodeGraphs` per kind of decode step (plain, shared-prefix); they share one
memory pool, which is safe because the steps never run concurrently and each step's logits are
consumed before the next replay.

A capture that fails (an op that syncs with the host, out of memory, ...) is not fatal: a warning
is logged and the engine decodes eagerly.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger(__name__)

# Eager runs per bucket before capture: compiles the Triton kernels and settles cuBLAS's choices.
WARMUP_RUNS = 2


def graph_buckets(max_rows: int) -> list[int]:
    """Batch sizes to capture: powers of two below `max_rows`, then `max_rows` itself."""
    if max_rows < 1:
        raise ValueError(f"max_rows = {max_rows}: expected at least 1")
    buckets, b = [], 1
    while b < max_rows:
        buckets.append(b)
        b *= 2
    return buckets + [max_rows]


class DecodeGraphs:
    """One captured decode forward per bucket; `forward(rows)` must return logits [rows, V] from static buffers."""

    def __init__(
        self,
        forward: Callable[[int], torch.Tensor],
        max_rows: int,
        device: torch.device | str,
        mempool: tuple[int, int] | None = None,
    ):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got '{self.device}'")
        self.buckets = graph_buckets(max_rows)
        self._forward = forward
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # A borrowed pool belongs to graphs that outlive these; an own pool is made afresh per capture,
        # since reusing the handle of a pool whose graphs were all freed is not allowed.
        self._owns_pool = mempool is None
        self._mempool = mempool

    @property
    def mempool(self) -> tuple[int, int] | None:
        """The memory pool of the captured graphs, to share with other graphs while these live."""
        return self._mempool

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def capture(self) -> bool:
        """Capture every bucket (largest first, sharing one memory pool); False, with a warning, on failure."""
        self._graphs.clear()
        try:
            with torch.cuda.device(self.device):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for rows in self.buckets:
                        for _ in range(WARMUP_RUNS):
                            self._forward(rows)
                torch.cuda.current_stream().wait_stream(side)
                if self._owns_pool:
                    self._mempool = torch.cuda.graph_pool_handle()
                mempool = self._mempool
                for rows in reversed(self.buckets):
                    graph = torch.cuda.CUDAGraph()
                    # thread_local: CUDA work of other threads (transport, weight sync) does not break the capture.
                    with torch.cuda.graph(graph, pool=mempool, capture_error_mode="thread_local"):
                        logits = self._forward(rows)  # [rows, V], a static output of the graph
                    self._graphs[rows] = (graph, logits)
                torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager decode
            self._graphs.clear()
            logger.warning(
                "CUDA graph capture of the decode step failed (%s: %s); decoding eagerly instead",
                type(err).__name__,
                err,
            )
            return False
        return True

    def bucket_for(self, rows: int) -> int | None:
        """The smallest captured bucket holding `rows` rows, or None (run eagerly)."""
        for bucket in self.buckets:
            if bucket >= rows and bucket in self._graphs:
                return bucket
        return None

    def replay(self, bucket: int) -> torch.Tensor:
        """Run bucket's graph on the buffers' current contents; returns its logits [bucket, V]."""
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits
