"""The trainer worker's update on synthetic GRPO rollouts, and settings timed against each other in one process.

`synthetic_micro_batches` makes rollouts of `benchmarks/grpo_step.py`'s shape (groups of completions of random
tokens after one prompt each, one group per micro-batch); `add_rollout_arguments` adds their shape to a parser.
Used by `host_memory.py`, `zero_gradient.py`, `segment_attention.py`, `token_stats_chunks.py` and
`one_rank_accumulation.py`; the last three switch a module constant through `alternate_module_setting`.

These machines are noisy (other tenants, clock changes), so a benchmark never compares times across runs: it runs
every setting in one process, repetition 0 in the given order, repetition 1 reversed, and so on, so that drift
over the run falls on every setting alike, and reports medians.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any, Callable, Sequence


def alternate(names: Sequence[str], reps: int, measure: Callable[[str], dict[str, Any]],
              tag: str | None = None) -> dict[str, dict[str, Any]]:
    """``{name: {"seconds": [...], <key>: [...], "median_s": ...}}`` from ``reps`` calls of ``measure(name)`` per
    name; ``measure`` sets its setting up, runs, and returns ``{"seconds": ..., <key>: ...}`` (every key kept as a
    list, in call order). With ``tag``, each call is printed as ``[tag] name: 1.23s, key value``."""
    names = list(names)
    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            record = measure(name)
            for key, value in record.items():
                out[name].setdefault(key, []).append(value)
            if tag:
                extra = "".join(f", {k} {v}" for k, v in record.items() if k != "seconds")
                print(f"[{tag}] {name}: {record['seconds']:.3f}s{extra}", flush=True)
    for v in out.values():
        v["median_s"] = statistics.median(v["seconds"])
    return out


def alternate_module_setting(module, name: str, values: dict[str, Any], step: Callable[[], Any], reps: int,
                             tag: str | None = None) -> dict[str, dict[str, Any]]:
    """`alternate` over the values of ``module.<name>``, a module constant the code reads on every call: ``step()``
    timed with ``module.<name> = values[key]`` per key; the constant is restored after."""
    before = getattr(module, name)

    def measure(key: str) -> dict[str, Any]:
        setattr(module, name, values[key])
        return {"seconds": timed(step)[0]}

    try:
        return alternate(values, reps, measure, tag=tag)
    finally:
        setattr(module, name, before)


def timed(fn: Callable[[], Any], digits: int = 3) -> tuple[float, Any]:
    """``(seconds, fn())``: the wall time of one call, rounded to ``digits``."""
    start = time.perf_counter()
    value = fn()
    return round(time.perf_counter() - start, digits), value


def synthetic_micro_batches(args, rng: random.Random, vocab_size: int):
    """``args.groups`` micro-batches of one group each (``args.group`` completions of ``args.min_tokens`` to
    ``args.max_tokens`` random tokens after one ``args.prompt_tokens``-token prompt, advantages uniform in [-1, 1]),
    and their number of completion tokens."""
    from rl.workers import MicroBatch

    prompts = [[rng.randrange(vocab_size) for _ in range(args.prompt_tokens)] for _ in range(args.groups)]
    completions = [[rng.randrange(vocab_size) for _ in range(rng.randint(args.min_tokens, args.max_tokens))]
                   for _ in range(args.groups * args.group)]
    batches = [MicroBatch([prompts[g]] * args.group, completions[g * args.group:(g + 1) * args.group],
                          [rng.uniform(-1, 1) for _ in range(args.group)], trained=[True] * args.group)
               for g in range(args.groups)]
    return batches, sum(map(len, completions))


def add_rollout_arguments(p: argparse.ArgumentParser) -> None:
    """``--model`` and the shape of `synthetic_micro_batches`."""
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--groups", type=int, default=8, help="prompts, one micro-batch each")
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--min-tokens", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=128)
