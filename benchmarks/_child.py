"""Run one phase of a benchmark in a fresh subprocess of the benchmark script itself.

Why a subprocess per phase: vLLM, TRL and a trainer in one process compete for RAM and threads,
and a fresh process is the only clean way to give each phase its own engine. The parent re-runs
its own script with ``--child TASK --json-out FILE`` (plus any extra arguments); the child writes
its result as JSON to FILE. ``stop_children_on_signal()`` makes SIGTERM/SIGINT of the parent end the
running child too (and so its vLLM engine and verifier pool).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]

_running: list[subprocess.Popen] = []


@dataclass
class ChildResult:
    task: str
    returncode: int | None
    result: dict[str, Any] | None  # the child's JSON, None if it wrote none
    log: str                       # its whole stdout + stderr
    wall_s: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.result is not None and not self.timed_out


def run_child(script: str | Path, task: str, argv: list[str], *, timeout_s: float,
              echo: Callable[[str], bool] = lambda line: False, env: dict[str, str] | None = None) -> ChildResult:
    """``python script *argv --child task --json-out TMP``, with ``env`` over this process's environment; lines for
    which ``echo`` is true are printed live."""
    with tempfile.TemporaryDirectory(prefix=f"{Path(script).stem}_") as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, str(Path(script).resolve()), *argv, "--child", task, "--json-out", str(out)]
        env = {**os.environ, **(env or {}),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        log: list[str] = []
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        _running.append(proc)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            proc.kill()

        watchdog = threading.Timer(timeout_s, kill)
        watchdog.start()
        try:
            for line in proc.stdout:
                log.append(line)
                if echo(line):
                    print(line, end="", flush=True)
            rc = proc.wait()
        finally:
            watchdog.cancel()
            _running.remove(proc)
        result = json.loads(out.read_text()) if out.is_file() else None
        return ChildResult(task, rc, result, "".join(log), time.perf_counter() - t, killed.is_set())


def _stop(signum, _frame) -> None:
    for proc in list(_running):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    sys.exit(128 + signum)


def stop_children_on_signal() -> None:
    """Make SIGTERM and SIGINT of this (parent) process end its running child first."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
