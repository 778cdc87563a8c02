"""A training job in which one rank joins start-up and then goes silent: run under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node=2 silent_rank.py RANK CONFIG [key=value ...]

Every rank but RANK runs the real `async-grpo train` role. Rank RANK creates the job's process groups
like any rank (so start-up completes) and then never takes part in anything again: as the learner it
publishes what a worker needs to start (endpoints, resume positions) but never broadcasts weights
nor says stop; as a worker it never joins a weight broadcast. It lingers until torchrun ends it, as
a hung process would. The fault tests check that the real ranks fail, naming the sync group, within
their configured timeouts.
"""

from __future__ import annotations

import os
import sys
import time

import torch.distributed as dist

from async_grpo import launch
from async_grpo.cli import main as cli_main
from async_grpo.config import load_config
from async_grpo.transport import store_keys
from async_grpo.transport.endpoints import LearnerEndpoints, publish_endpoints

LINGER_S = 120.0  # far longer than the tests' timeouts: only torchrun ends a silent rank


def go_silent(config: str, overrides: list[str]) -> int:
    cfg = load_config(config, overrides)
    layout = launch.plan_layout(cfg, int(os.environ["WORLD_SIZE"]))
    groups = launch.init_groups(layout, use_cuda=False, sync_backend="gloo",
                                timeout_s=cfg.transport.collective_timeout_s, sync_timeout_s=cfg.transport.sync_timeout_s)
    if groups.is_learner:
        store = dist.distributed_c10d._get_default_store()
        store.set(store_keys.RESUME_POSITIONS, "{}")
        # Addresses nobody listens on: a worker connects lazily and hears nothing.
        publish_endpoints(store, LearnerEndpoints("tcp://127.0.0.1:1", "tcp://127.0.0.1:1"))
    time.sleep(LINGER_S)
    return 0


if __name__ == "__main__":
    silent_rank, config, *overrides = sys.argv[1:]
    if int(os.environ["RANK"]) == int(silent_rank):
        sys.exit(go_silent(config, overrides))
    sys.exit(cli_main(["train", config, *overrides]))
