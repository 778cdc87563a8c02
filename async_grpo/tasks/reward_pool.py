"""Scoring completions with a reward function that may be slow, hang, raise or crash its process.

`RewardScorer(spec, workers=0)` calls the function inline and turns exceptions into
`on_failure`. With `workers > 0` it keeps that many spawned child processes, each serving one call at a
time over a pipe. A call that runs past `timeout_s` gets its process killed and replaced; a call that
raises, returns a non-number or kills its process scores `on_failure`. Either way the caller receives a
score within about `timeout_s` per call, so a broken reward can slow a rollout worker but never stall it.
Failures are counted in `stats` (calls, failures, timeouts, errors, crashes, restarts) for metrics.

A batch of calls is spread over the processes; each call's timeout starts when a ready process takes
it (a replacement process is not handed work until it has imported the reward function). The processes
start on the first call and stop on `close()`; spawning needs a non-daemonic calling process.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Sequence

from async_grpo.tasks.reward_spec import RewardSpec

logger = logging.getLogger(__name__)

RewardCall = tuple[str, str, dict]  # (prompt, completion, item)
_BOOT_TIMEOUT_S = 120.0  # a process that cannot import the reward function in this long is broken
_LOGGED_FAILURES = 5  # failures logged one by one before the scorer falls silent (stats keep counting)


def checked_reward(value: Any) -> float:
    """The reward as a float; anything but a finite real number is an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"reward function returned {value!r}: expected a finite float")
    return float(value)


def _serve_rewards(conn: Connection, spec: RewardSpec) -> None:
    """Child process loop: resolve the function once, say ready, then answer one call per message."""
    fn = spec.resolve()
    conn.send(("ready", None))
    while True:
        try:
            call = conn.recv()
        except (EOFError, OSError):
            return
        if call is None:
            return
        prompt, completion, item = call
        try:
            conn.send(("ok", checked_reward(fn(prompt, completion, item))))
        except (Exception, SystemExit) as err:
            conn.send(("error", f"{type(err).__name__}: {err}"))


class _RewardProcess:
    """One child process and the call it is serving, if any."""

    def __init__(self, ctx: Any, spec: RewardSpec):
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_serve_rewards, args=(child_conn, spec), daemon=True, name="reward-worker")
        self.process.start()
        child_conn.close()  # so that the child's death shows up here as EOF
        self.ready = False
        self.boot_deadline = time.monotonic() + _BOOT_TIMEOUT_S
        self.call: int | None = None  # index in the current batch
        self.deadline = math.inf

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=10)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)
        self.conn.close()


class RewardScorer:
    """Runs one reward function on batches of calls, inline (`workers=0`) or in a process pool."""

    def __init__(self, spec: RewardSpec, workers: int = 0, timeout_s: float = 10.0, on_failure: float = 0.0):
        if workers < 0:
            raise ValueError(f"reward workers = {workers}: expected 0 (inline) or more")
        if not timeout_s > 0:
            raise ValueError(f"reward timeout_s = {timeout_s}: expected a positive number of seconds")
        self.spec, self.workers, self.timeout_s, self.on_failure = spec, workers, timeout_s, float(on_failure)
        self.stats = {"calls": 0, "failures": 0, "timeouts": 0, "errors": 0, "crashes": 0, "restarts": 0}
        self.last_error: str | None = None
        self._fn = spec.resolve()  # resolved here too, so a bad reward fails at start, in this process
        self._ctx = mp.get_context("spawn")
        self._pool: list[_RewardProcess] = []  # started on the first call: a process that never scores has none
        self._closed = False

    def score(self, prompt: str, completion: str, item: dict) -> float:
        return self.score_batch([(prompt, completion, item)])[0]

    def score_batch(self, calls: Sequence[RewardCall]) -> list[float]:
        if self._closed:
            raise RuntimeError(f"reward scorer for {self.spec.target} is closed: expected no calls after close()")
        self.stats["calls"] += len(calls)
        if self.workers == 0:
            return [self._score_inline(call) for call in calls]
        return self._score_in_pool(calls)

    def _score_inline(self, call: RewardCall) -> float:
        try:
            return checked_reward(self._fn(*call))
        except Exception as err:
            return self._failed("errors", f"{type(err).__name__}: {err}")

    def _failed(self, kind: str, message: str) -> float:
        self.stats[kind] += 1
        self.stats["failures"] += 1
        self.last_error = f"{kind[:-1]}: {message}"
        if self.stats["failures"] <= _LOGGED_FAILURES:
            logger.warning("reward %s scored %s: %s", self.spec.target, self.on_failure, self.last_error)
        return self.on_failure

    def _replace(self, worker: _RewardProcess) -> None:
        worker.kill()
        self._pool[self._pool.index(worker)] = _RewardProcess(self._ctx, self.spec)
        self.stats["restarts"] += 1

    def _score_in_pool(self, calls: Sequence[RewardCall]) -> list[float]:
        if not self._pool:
            self._pool = [_RewardProcess(self._ctx, self.spec) for _ in range(self.workers)]
        results: list[float | None] = [None] * len(calls)
        pending = deque(range(len(calls)))
        while pending or any(w.call is not None for w in self._pool):
            for worker in self._pool:
                if pending and worker.ready and worker.call is None:
                    index = pending.popleft()
                    try:
                        worker.conn.send(calls[index])
                    except (OSError, ValueError):  # died while idle: not this call's fault, retry it
                        pending.appendleft(index)
                        self._replace(worker)
                        continue
                    worker.call, worker.deadline = index, time.monotonic() + self.timeout_s
            waiting = [w for w in self._pool if w.call is not None or not w.ready]
            next_deadline = min(w.deadline if w.ready else w.boot_deadline for w in waiting)
            by_conn = {w.conn: w for w in waiting}
            for conn in wait(list(by_conn), timeout=max(0.0, next_deadline - time.monotonic())):
                self._receive(by_conn[conn], results)
            now = time.monotonic()
            for worker in list(self._pool):
                if worker.call is not None and now >= worker.deadline:
                    results[worker.call] = self._failed("timeouts", f"call took over {self.timeout_s}s")
                    self._replace(worker)
                elif not worker.ready and now >= worker.boot_deadline:
                    raise RuntimeError(
                        f"reward worker for {self.spec.target} did not start within {_BOOT_TIMEOUT_S}s"
                    )
        return [float(r) for r in results]

    def _receive(self, worker: _RewardProcess, results: list[float | None]) -> None:
        try:
            kind, payload = worker.conn.recv()
        except (EOFError, OSError):
            if worker.call is None:
                raise RuntimeError(
                    f"reward worker for {self.spec.target} exited while starting (exit code "
                    f"{worker.process.exitcode}); check that the reward module imports in a fresh process"
                ) from None
            results[worker.call] = self._failed("crashes", f"reward process exited with code {worker.process.exitcode}")
            self._replace(worker)
            return
        if kind == "ready":
            worker.ready = True
            return
        index, worker.call, worker.deadline = worker.call, None, math.inf
        results[index] = payload if kind == "ok" else self._failed("errors", payload)

    def close(self) -> None:
        for worker in self._pool:
            worker.stop()
        self._pool = []
        self._closed = True

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
