"""Names and places in a run directory (docs/architecture.md, Run directory), shared by the writers and the report.

    runs/<recipe>/run.json
    runs/<recipe>/<arm>/sft/{metrics.jsonl, masks.html, DONE}
    runs/<recipe>/<arm>/rl/{metrics.jsonl, DONE}
    runs/<recipe>/<arm>/eval/<point>/<benchmark_filename(benchmark)>
    runs/<recipe>/report/{table.md, table.csv, *.png, index.html}

Evaluation points are ``before_sft``, ``after_sft``, ``rl_step_<N>`` and ``after_rl``; on the run's
single timeline (SFT steps, then RL steps) they sit at :func:`point_step`.

Pure standard library: the evaluation and pipeline code can import this without matplotlib.
"""

from __future__ import annotations

import re
from pathlib import Path

BEFORE_SFT = "before_sft"
AFTER_SFT = "after_sft"
AFTER_RL = "after_rl"
RL_STEP_PREFIX = "rl_step_"
_RL_STEP_RE = re.compile(r"^rl_step_(\d+)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

RUN_JSON = "run.json"
REPORT_DIR = "report"
METRICS_FILE = "metrics.jsonl"
MASKS_FILE = "masks.html"
DONE_FILE = "DONE"


def benchmark_stem(name: str) -> str:
    """The benchmark name with every character outside ``[A-Za-z0-9._-]`` replaced by ``_``.

    ``"embedded:arithmetic" -> "embedded_arithmetic"``, ``"org/set:test" -> "org_set_test"``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"benchmark name must be a non-empty string, got {name!r}")
    return _UNSAFE.sub("_", name)


def benchmark_filename(name: str) -> str:
    """File name of a benchmark's evaluation JSON inside ``<arm>/eval/<point>/``, *including* ``.json``.

    ``"embedded:arithmetic" -> "embedded_arithmetic.json"``, ``"gsm8k" -> "gsm8k.json"``. The mapping is
    not injective (``a:b`` and ``a/b`` share a file); the JSON's own ``"benchmark"`` field is authoritative.
    """
    return benchmark_stem(name) + ".json"


def rl_step_point(step: int) -> str:
    """Point name of the evaluation after RL step ``step``: ``rl_step_point(20) == "rl_step_20"``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"RL step must be a non-negative int, got {step!r}")
    return f"{RL_STEP_PREFIX}{step}"


def parse_rl_step(point: str) -> int | None:
    """``"rl_step_20" -> 20``; ``None`` for any other point name."""
    m = _RL_STEP_RE.match(point)
    return int(m.group(1)) if m else None


def is_point(point: str) -> bool:
    return point in (BEFORE_SFT, AFTER_SFT, AFTER_RL) or parse_rl_step(point) is not None


def point_step(point: str, sft_steps: int, rl_steps: int | None) -> int:
    """x position of an evaluation point on the arm's timeline (SFT steps, then RL steps).

    ``before_sft -> 0``, ``after_sft -> sft_steps``, ``rl_step_N -> sft_steps + N``,
    ``after_rl -> sft_steps + rl_steps``. An arm without SFT has ``sft_steps == 0``.
    """
    if sft_steps < 0:
        raise ValueError(f"sft_steps must be >= 0, got {sft_steps}")
    if point == BEFORE_SFT:
        return 0
    if point == AFTER_SFT:
        return sft_steps
    if point == AFTER_RL:
        if rl_steps is None:
            raise ValueError("after_rl needs the number of RL steps")
        return sft_steps + rl_steps
    n = parse_rl_step(point)
    if n is None:
        raise ValueError(f"unknown evaluation point {point!r} "
                         "(expected before_sft, after_sft, rl_step_<N> or after_rl)")
    return sft_steps + n


def point_sort_key(point: str) -> tuple[int, int]:
    """Chronological order: before_sft < after_sft < rl_step_1 < rl_step_2 < ... < after_rl < unknown."""
    if point == BEFORE_SFT:
        return (0, 0)
    if point == AFTER_SFT:
        return (1, 0)
    n = parse_rl_step(point)
    if n is not None:
        return (2, n)
    if point == AFTER_RL:
        return (3, 0)
    return (4, 0)


def eval_path(run_dir: str | Path, arm: str, point: str, benchmark: str) -> Path:
    """``<run_dir>/<arm>/eval/<point>/<benchmark_filename(benchmark)>``."""
    return Path(run_dir) / arm / "eval" / point / benchmark_filename(benchmark)


def sft_metrics_path(run_dir: str | Path, arm: str) -> Path:
    return Path(run_dir) / arm / "sft" / METRICS_FILE


def rl_metrics_path(run_dir: str | Path, arm: str) -> Path:
    return Path(run_dir) / arm / "rl" / METRICS_FILE


def masks_path(run_dir: str | Path, arm: str) -> Path:
    return Path(run_dir) / arm / "sft" / MASKS_FILE


def report_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / REPORT_DIR
