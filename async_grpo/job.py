"""One process of a training job: process groups, then the learner loop or a rollout worker loop.

Called by `async-grpo train` under torchrun. Every rank builds every group in the same order
(launch.py); learner ranks then run learner/loop.py, worker ranks workers/rollout_loop.py. This is
the only module that knows both roles, and it imports each lazily, so a worker process never loads
DeepSpeed and a learner process never builds an engine.

Each process writes its pid to `out_dir/pids/rank<r>.pid` when it starts (and removes it when it
ends normally), so an operator or a fault test can find, say, the learner (rank 0) or a worker rank
without scanning the process table; a restarted job overwrites the files with the new pids.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from async_grpo.config import RunConfig
from async_grpo.launch import Layout, init_groups, pick_device

log = logging.getLogger(__name__)


def _default_store() -> dist.Store:
    # The TCPStore torchrun started (env:// rendezvous); init_process_group registered it as the default.
    return dist.distributed_c10d._get_default_store()


def run_job(cfg: RunConfig, layout: Layout, resume: bool) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s [rank %(process)d] %(message)s")
    use_cuda = torch.cuda.is_available() and cfg.workers.device != "cpu" and cfg.learner.device != "cpu"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", layout.world_size))
    # NCCL cannot hold two ranks on one GPU: when roles share a device, weights go over gloo.
    share_gpu = use_cuda and torch.cuda.device_count() < local_world
    sync_backend = "gloo" if (not use_cuda or share_gpu) else "nccl"
    rank = int(os.environ["RANK"])
    pid_file = _write_pid_file(cfg.out_dir, rank)
    if use_cuda:
        torch.cuda.set_device(pick_device("cuda", int(os.environ.get("LOCAL_RANK", 0)), share_gpu))
    groups = init_groups(layout, use_cuda=use_cuda, sync_backend=sync_backend,
                         timeout_s=cfg.transport.collective_timeout_s, sync_timeout_s=cfg.transport.sync_timeout_s)
    store = _default_store()
    torch.manual_seed(cfg.seed + rank)
    try:
        if groups.is_learner:
            from async_grpo.learner.loop import run_learner

            return run_learner(cfg, groups, store, resume)
        return _run_worker_rank(cfg, groups, store, share_gpu)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        _remove_pid_file(pid_file)


def _write_pid_file(out_dir: str, rank: int) -> Path:
    path = Path(out_dir) / "pids" / f"rank{rank}.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(f".tmp{os.getpid()}")
    temp.write_text(f"{os.getpid()}\n")
    temp.replace(path)  # atomic: a reader never sees an empty file
    return path


def _remove_pid_file(path: Path) -> None:
    # A restarted process of the same rank may have written its own pid since: leave that one alone.
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def _run_worker_rank(cfg: RunConfig, groups, store: dist.Store, share_gpu: bool) -> int:
    from async_grpo.model.build import DTYPES, build_model
    from async_grpo.tasks.base import build_task
    from async_grpo.transport.control import WeightsListener
    from async_grpo.transport.endpoints import read_endpoints
    from async_grpo.transport.stream import TrajectoryStream
    from async_grpo.transport.weights import WeightReceiver
    from async_grpo.workers.engine import GenerationEngine
    from async_grpo.transport.store_keys import RESUME_POSITIONS
    from async_grpo.workers.rollout_loop import WorkerContext, run_worker

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg.workers.device, local_rank, share_gpu)
    dtype = DTYPES[cfg.model.dtype]
    model = build_model(cfg.model, device=device, dtype=dtype, tp_group=groups.tp_group)
    model.eval()
    engine = GenerationEngine(model, cfg.kv, device, dtype, tp_group=groups.tp_group)
    task = build_task(cfg.task, cfg.seed, tokenizer_path=cfg.model.path)
    endpoints = read_endpoints(store, cfg.transport.collective_timeout_s)
    positions = json.loads(store.get(RESUME_POSITIONS))
    sync_name = f"sync-{groups.worker_group}"
    tp_rank = groups.tp_rank
    ctx = WorkerContext(
        cfg=cfg,
        worker_group=groups.worker_group,
        num_worker_groups=groups.layout.num_worker_groups,
        tp_rank=tp_rank,
        tp_group=groups.tp_group,
        store=store,
        model=model,
        engine=engine,
        receiver=WeightReceiver(groups.sync_groups[sync_name], timeout_s=cfg.transport.sync_timeout_s,
                                name=sync_name, device=device),
        listener=WeightsListener(endpoints.control, sync_name, cfg.transport),
        stream=TrajectoryStream(endpoints.trajectories, cfg.transport) if tp_rank == 0 else None,
        task=task,
    )
    try:
        position = int(positions.get(str(groups.worker_group), 0))
        log.info("worker group %d rank %d starts at prompt position %d", groups.worker_group, tp_rank, position)
        return run_worker(ctx, resume_position=position)
    finally:
        ctx.listener.close()
        if ctx.stream is not None:
            ctx.stream.close()
        task.close()
