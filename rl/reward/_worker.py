"""Verifier worker process: runs math-verify on one (gold, answer) pair at a time.

This module is the only place that imports math_verify, and only inside the
worker process, so the caller never pays its import time or its risks. The
worker disables math-verify's own SIGALRM timeouts: they only work in a main
thread and cannot interrupt a long C-level operation (``9^{9^{9^9}}`` spends
its time inside one big-integer ``pow``). The hard deadline is enforced from
outside instead: the parent SIGKILLs a worker that does not answer in time.

Protocol over a duplex Pipe:
    worker -> parent  ("ready", pid)                 once, after imports
    parent -> worker  (task_id, gold, answer, sleep_s)
    worker -> parent  (task_id, correct: bool, error: str | None)
    parent -> worker  None                           optional: please exit
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable


def _limit_memory(memory_limit_mb: int | None) -> None:
    """Cap this process's address space so a runaway expression gets a
    MemoryError instead of swapping the host to death before the deadline."""
    if not memory_limit_mb:
        return
    try:
        import resource

        limit = int(memory_limit_mb) * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass  # best effort: the hard deadline still applies


def _exit_when_orphaned(parent_pid: int, period_s: float = 1.0) -> None:
    """Exit if the parent dies (e.g. it was SIGKILLed and could not clean up).

    Best effort: during a long C call this thread cannot get the GIL, but
    the worker then also exits on the broken pipe when the call returns.
    """

    def watch() -> None:
        while True:
            time.sleep(period_s)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch, name="verifier-orphan-watch", daemon=True).start()


def make_verifier() -> Callable[[str, str], tuple[bool, str | None]]:
    """Import math-verify and return ``verify_pair(gold, answer)``.

    Both strings are wrapped as ``\\boxed{...}`` so the LaTeX extractor takes
    exactly the given answer (boxed match first), with the plain-expression
    extractor as a second chance for things like ``3/4``.
    """
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    def parse_boxed(s: str) -> list[Any]:
        s = s.strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":  # gold written as "$...$"
            s = s.strip("$")
        return parse("\\boxed{" + s + "}", extraction_config=configs, parsing_timeout=None)

    def verify_pair(gold: str, answer: str) -> tuple[bool, str | None]:
        gold_parsed = parse_boxed(gold)
        if not gold_parsed:
            return False, "unparsable_gold"
        answer_parsed = parse_boxed(answer)
        if not answer_parsed:
            return False, "unparsable_answer"
        return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None)), None

    return verify_pair


def worker_main(conn: Connection, parent_pid: int, memory_limit_mb: int | None) -> None:
    """Entry point of a verifier process (target of ``Process``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    _limit_memory(memory_limit_mb)
    _exit_when_orphaned(parent_pid)
    verify_pair = make_verifier()
    # The first parse builds ANTLR/sympy caches (~0.5 s); pay it before "ready"
    # so it is not charged to the first real item's deadline.
    try:
        verify_pair("\\frac{1}{2}", "0.5")
    except Exception:  # noqa: BLE001 - a broken verifier shows up on real items
        pass
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, gold, answer, sleep_s = msg
        if sleep_s > 0:  # test hook only: simulates a verifier that hangs
            time.sleep(sleep_s)
        try:
            correct, error = verify_pair(gold, answer)
        except BaseException as exc:  # noqa: BLE001 - MemoryError, RecursionError, sympy bugs
            correct, error = False, f"{type(exc).__name__}: {str(exc)[:200]}"
        try:
            conn.send((task_id, correct, error))
        except (BrokenPipeError, OSError):
            return
