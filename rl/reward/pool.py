"""A small process pool with a HARD per-item deadline, for math verification.

Why not ``concurrent.futures`` or ``multiprocessing.Pool``: they cannot kill a
worker that is stuck in one task, so one ``\\boxed{9^{9^{9^9}}}`` would block
the queue (and the GRPO step) for hours. Here every worker has its own pipe
and gets one item at a time; the parent polls all pipes with deadlines and
SIGKILLs + replaces a worker that misses its deadline. The items queued behind
it go to the other workers (and to the replacement once it is up), so a call
takes at most about ``ceil(n_items / n_workers) * timeout_s`` plus worker
start-up, and never raises because of a bad item.

Workers are started lazily with the 'spawn' context (safe inside threads and
Ray actors, no inherited CUDA or locks) and reused across calls, because
starting one costs about a second. As with any 'spawn' pool, a script that
uses it must guard its entry point with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Sequence

from rl.reward._worker import worker_main

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class VerifyTask:
    """One comparison. ``debug_sleep_s`` is a test hook: the worker sleeps that
    long before verifying, to simulate a verifier that truly hangs (which no
    input can be relied on to cause on every sympy version)."""

    gold: str
    answer: str
    debug_sleep_s: float = 0.0


@dataclass(frozen=True, slots=True)
class VerifyOutcome:
    """What the pool says about one task; ``timeout`` means the worker was killed."""

    correct: bool
    timeout: bool = False
    error: str | None = None


class _Worker:
    """One verifier process and the parent's end of its pipe."""

    def __init__(self, ctx: mp.context.BaseContext, memory_limit_mb: int | None) -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=worker_main,
            args=(child_conn, os.getpid(), memory_limit_mb),
            name="rl-math-verifier",
            daemon=True,
        )
        self.proc.start()
        child_conn.close()
        self.conn: Connection = parent_conn
        self.started_at = time.monotonic()
        self.ready = False
        self.pid: int | None = None
        # (index in the current batch, task id, deadline) while busy
        self.job: tuple[int, int, float] | None = None

    def kill(self) -> None:
        """SIGKILL and reap; safe to call twice."""
        try:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=5)
        except (OSError, ValueError, AssertionError):
            pass
        try:
            self.conn.close()
        except OSError:
            pass


class VerifierPool:
    """Process pool that verifies (gold, answer) pairs with a hard deadline each.

    Thread-safe (calls are serialised). Use as a context manager or call
    :meth:`close`; a pool that is garbage-collected or outlived by the
    interpreter takes its daemon workers with it.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout_s: float = 5.0,
        *,
        start_method: str = "spawn",
        startup_timeout_s: float = 120.0,
        memory_limit_mb: int | None = 2048,
    ) -> None:
        if num_workers is None:
            num_workers = min(4, os.cpu_count() or 1)
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers = int(num_workers)
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.memory_limit_mb = memory_limit_mb
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()
        self._next_task_id = 0
        self._closed = False
        self.killed_workers = 0  # counter of deadline kills, for logs and tests

    # ---------------------------------------------------------------- life cycle
    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def close(self) -> None:
        """Kill all workers. Idempotent; a closed pool cannot be used again."""
        with self._lock:
            self._closed = True
            if os.getpid() == self._owner_pid:
                for w in self._workers:
                    w.kill()
            self._workers = []

    @property
    def closed(self) -> bool:
        return self._closed

    def worker_pids(self) -> list[int | None]:
        """PIDs of the current workers (None while one is still starting)."""
        return [w.pid for w in self._workers]

    def warmup(self) -> None:
        """Start the workers now and wait until they are ready, so the first
        real call does not pay the start-up (e.g. before RL step 0)."""
        self.map([])

    def _ensure_workers(self) -> None:
        if self._closed:
            raise RuntimeError("VerifierPool is closed")
        if os.getpid() != self._owner_pid:  # we are a forked child: not our workers
            self._workers, self._owner_pid = [], os.getpid()
        alive = []
        for w in self._workers:
            if w.proc.is_alive():
                alive.append(w)
            else:  # died between calls (e.g. killed from outside)
                w.kill()
        while len(alive) < self.num_workers:
            alive.append(_Worker(self._ctx, self.memory_limit_mb))
        self._workers = alive

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._ctx, self.memory_limit_mb)

    # ---------------------------------------------------------------- the loop
    def map(
        self, tasks: Sequence[VerifyTask], timeout_s: float | None = None
    ) -> list[VerifyOutcome]:
        """Verify all tasks; outcome i belongs to task i.

        Each task gets ``timeout_s`` (default: the pool's) from the moment it
        is sent to a ready worker. With an empty ``tasks`` this just waits for
        the workers to be ready.
        """
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        if timeout <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout}")
        with self._lock:
            self._ensure_workers()
            return self._run(list(tasks), timeout, wait_ready=not tasks)

    def _run(self, tasks: list[VerifyTask], timeout: float, wait_ready: bool) -> list[VerifyOutcome]:
        results: list[VerifyOutcome | None] = [None] * len(tasks)
        pending = collections.deque(range(len(tasks)))
        startup_failures = 0
        while True:
            self._dispatch(tasks, pending, timeout)
            busy = [w for w in self._workers if w.job is not None]
            starting = [w for w in self._workers if not w.ready]
            if not pending and not busy and not (wait_ready and starting):
                break
            if startup_failures > 2 * self.num_workers and not any(w.ready for w in self._workers):
                for i in pending:  # workers cannot even start: give up on the rest, loudly
                    results[i] = VerifyOutcome(False, error="verifier_unavailable")
                logger.error("math verifier workers fail to start; items scored 0")
                break

            now = time.monotonic()
            deadlines = [w.job[2] for w in busy] + [
                w.started_at + self.startup_timeout_s for w in starting
            ]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 0.05
            for conn in wait([w.conn for w in self._workers], timeout=min(wait_s, 1.0)):
                worker = next((w for w in self._workers if w.conn is conn), None)
                if worker is not None:
                    startup_failures += self._receive(worker, results)

            now = time.monotonic()
            for w in list(self._workers):
                if w.job is not None and now >= w.job[2]:
                    results[w.job[0]] = VerifyOutcome(False, timeout=True)
                    self.killed_workers += 1
                    logger.info("math verifier timed out after %.1fs; worker killed", timeout)
                    self._replace(w)
                elif not w.ready and now >= w.started_at + self.startup_timeout_s:
                    startup_failures += 1
                    self._replace(w)
        return [r if r is not None else VerifyOutcome(False, error="lost") for r in results]

    def _dispatch(self, tasks: list[VerifyTask], pending: collections.deque[int], timeout: float) -> None:
        """Give one pending item to every idle ready worker."""
        for w in list(self._workers):
            if not pending:
                return
            if not w.ready or w.job is not None:
                continue
            index = pending.popleft()
            task = tasks[index]
            self._next_task_id += 1
            try:
                w.conn.send((self._next_task_id, task.gold, task.answer, float(task.debug_sleep_s)))
            except (OSError, ValueError):  # worker died while idle: requeue, replace
                pending.appendleft(index)
                self._replace(w)
                continue
            w.job = (index, self._next_task_id, time.monotonic() + timeout)

    def _receive(self, worker: _Worker, results: list[VerifyOutcome | None]) -> int:
        """Handle one message (or EOF) from a worker; returns 1 on a start-up failure."""
        try:
            msg = worker.conn.recv()
        except (EOFError, OSError):  # the process died (crash, OOM kill, outside kill)
            if worker.job is not None:
                results[worker.job[0]] = VerifyOutcome(False, error="worker_crashed")
            failed_at_startup = 0 if worker.ready else 1
            self._replace(worker)
            return failed_at_startup
        if msg[0] == "ready":
            worker.ready, worker.pid = True, msg[1]
            return 0
        task_id, correct, error = msg
        if worker.job is not None and worker.job[1] == task_id:
            results[worker.job[0]] = VerifyOutcome(bool(correct), error=error)
            worker.job = None
        return 0
