"""Read a run directory (finished or still in progress) into plain Python objects.

Everything is optional except the directory itself: a missing ``run.json`` is reconstructed from
what is on disk, a metrics line that is cut short (a writer mid-line) is skipped, an evaluation JSON
that does not parse yet is ignored.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eksft import layout

log = logging.getLogger(__name__)


@dataclass
class RunData:
    run_dir: Path
    recipe: str
    arms: list[str]
    benchmarks: list[str]
    eval_n: int | None
    sft_steps: dict[str, int]
    rl_steps: int | None  # planned RL steps (run.json); None when unknown or given per arm
    config: dict[str, Any] = field(default_factory=dict)
    sft_metrics: dict[str, list[dict]] = field(default_factory=dict)  # arm -> rows (phase "sft")
    rl_metrics: dict[str, list[dict]] = field(default_factory=dict)   # arm -> rows (phase "rl")
    evals: dict[str, dict[str, dict[str, dict]]] = field(default_factory=dict)  # arm -> point -> benchmark -> record
    eval_files: dict[str, dict[str, dict[str, Path]]] = field(default_factory=dict)  # same keys -> file
    rl_steps_by_arm: dict[str, int] = field(default_factory=dict)  # when run.json gives rl_steps per arm
    base_evals: dict[str, dict] = field(default_factory=dict)  # the starting model: benchmark -> record
    base_eval_files: dict[str, Path] = field(default_factory=dict)
    # A run with seeds: the fields above hold the first seed's metrics and evaluations (what links and timelines
    # read); ``per_seed`` holds every seed's (this object first), which the table's and curves' statistics pool.
    seed: int | None = None  # the seed of this view (None: a run without seed level)
    per_seed: list[RunData] = field(default_factory=list, repr=False, compare=False)

    @property
    def views(self) -> list[RunData]:
        """Every seed's data, in seed order (this object alone when it was not loaded by `load_run`)."""
        return self.per_seed or [self]

    @property
    def seeds(self) -> list[int | None]:
        """The run's seeds (``[None]`` for a run without seed level)."""
        return [r.seed for r in self.views]

    @property
    def num_seeds(self) -> int:
        return len(self.views)

    def seed_records(self, arm: str, point: str, benchmark: str) -> list[dict | None]:
        """The evaluation record of (arm, point, benchmark) at every seed, in seed order (None where missing)."""
        return [r.eval_record(arm, point, benchmark) for r in self.views]

    def seed_base_records(self, benchmark: str) -> list[dict | None]:
        """The starting model's record of ``benchmark`` at every seed (its sampling follows the seed too)."""
        return [r.base_evals.get(benchmark) for r in self.views]

    @property
    def baseline_arm(self) -> str | None:
        """The arm the others are compared with: ``report.baseline_arm`` of the recipe, else the first arm whose
        objective is ``sft``, else the first arm (None when the run has no arm)."""
        chosen = (self.config.get("report") or {}).get("baseline_arm")
        if chosen in self.arms:
            return chosen
        objectives = {a.get("name"): (a.get("objective") or {}).get("name")
                      for a in self.config.get("arms") or [] if isinstance(a, dict)}
        sft = [a for a in self.arms if objectives.get(a) == "sft"]
        if not objectives and "sft" in self.arms:  # no recipe on record: the arm named sft
            sft = ["sft"]
        return (sft or self.arms or [None])[0]

    @property
    def level(self) -> float:
        return float((self.config.get("report") or {}).get("level") or 0.95)

    @property
    def n_boot(self) -> int:
        return int((self.config.get("report") or {}).get("n_boot") or 2000)

    @property
    def k(self) -> int | None:
        """The k of the table's pass@k: the run's n (the largest k), else the largest k found on disk."""
        if self.eval_n:
            return int(self.eval_n)
        ks = [int(k) for arm in self.evals.values() for pt in arm.values() for rec in pt.values()
              for k in (rec.get("pass@k") or {})]
        return max(ks) if ks else None

    def eval_record(self, arm: str, point: str, benchmark: str) -> dict | None:
        return self.evals.get(arm, {}).get(point, {}).get(benchmark)

    def arm_rl_steps(self, arm: str) -> int | None:
        """Planned RL steps (run.json), else the last RL step logged for this arm."""
        if arm in self.rl_steps_by_arm:
            return self.rl_steps_by_arm[arm]
        if self.rl_steps is not None:
            return self.rl_steps
        rows = self.rl_metrics.get(arm) or []
        return max((int(r["step"]) for r in rows if "step" in r), default=None)


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        log.warning("skipping %s: %s", path, e)
        return None


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; lines that are not complete JSON objects (e.g. being written) are skipped."""
    rows: list[dict] = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return rows
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # a last line without its newline is a writer mid-line (run in progress): expected
            partial = i == len(lines) and not text.endswith("\n")
            (log.debug if partial else log.warning)("%s:%d: not a complete JSON line, skipped", path, i)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def number(value: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN / inf values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _load_evals(arm_dir: layout.ArmDir, benchmarks: list[str]):
    by_file = {layout.benchmark_filename(b): b for b in benchmarks}
    evals: dict[str, dict[str, dict]] = {}
    files: dict[str, dict[str, Path]] = {}
    eval_dir = arm_dir.evals
    if not eval_dir.is_dir():
        return evals, files
    points = [p for p in eval_dir.iterdir() if p.is_dir()]
    for pdir in sorted(points, key=lambda p: layout.point_sort_key(p.name)):
        for f in sorted(pdir.glob("*.json")):
            rec = _read_json(f)
            if not isinstance(rec, dict):
                continue
            name = rec.get("benchmark") or by_file.get(f.name) or f.stem
            evals.setdefault(pdir.name, {})[name] = rec
            files.setdefault(pdir.name, {})[name] = f
    return evals, files


def load_run(run_dir: str | Path) -> RunData:
    """Load ``run_dir`` (``runs/<recipe>/``), every seed of it. Raises FileNotFoundError if it is not a directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    run = layout.RunLayout(run_dir)
    meta = _read_json(run.run_json) or {}
    arms = list(meta.get("arms") or [])
    arms += [a for a in run.arms_on_disk() if a not in arms]  # an arm on disk but not (yet) in run.json still shows
    seeds = meta.get("seeds") or run.seeds_on_disk()
    views = [_load_seed(run, meta, arms, seed) for seed in seeds]
    benchmarks = list(views[0].benchmarks)  # each seed's files may name benchmarks run.json does not
    for view in views[1:]:
        benchmarks += [b for b in view.benchmarks if b not in benchmarks]
    for view in views:
        view.benchmarks, view.per_seed = benchmarks, views
    return views[0]


def _load_seed(run: layout.RunLayout, meta: dict, arms: list[str], seed: int | None) -> RunData:
    benchmarks = list(meta.get("benchmarks") or [])

    sft_metrics = {a: [r for r in read_jsonl(run.arm(a, seed).sft.metrics) if r.get("phase", "sft") == "sft"]
                   for a in arms}
    rl_metrics = {a: [r for r in read_jsonl(run.arm(a, seed).rl.metrics) if r.get("phase", "rl") == "rl"] for a in arms}

    evals, eval_files = {}, {}
    for a in arms:
        evals[a], eval_files[a] = _load_evals(run.arm(a, seed), benchmarks)
    # The starting model is evaluated once (_base) and copied into every arm's before_sft.
    base_points, base_files = _load_evals(run.base(seed), benchmarks)
    base_evals = base_points.get(layout.BEFORE_SFT.name, {})
    base_eval_files = base_files.get(layout.BEFORE_SFT.name, {})
    for a in arms:
        if not base_evals and layout.BEFORE_SFT.name in evals[a]:
            base_evals, base_eval_files = evals[a][layout.BEFORE_SFT.name], eval_files[a][layout.BEFORE_SFT.name]
    for a in arms:  # benchmarks not declared in run.json, in order of appearance
        for pt in evals[a].values():
            for b in pt:
                if b not in benchmarks:
                    benchmarks.append(b)

    planned = meta.get("sft_steps") or {}
    if not isinstance(planned, dict):  # a single number for every SFT arm
        planned = {a: int(planned) for a in arms}
    sft_steps = {}
    for a in arms:
        if a in planned and planned[a] is not None:
            sft_steps[a] = int(planned[a])
        else:
            sft_steps[a] = max((int(r["step"]) for r in sft_metrics[a] if "step" in r), default=0)

    eval_n = meta.get("eval_n")
    if eval_n is None:
        ns = [int(rec["n"]) for arm in evals.values() for pt in arm.values() for rec in pt.values()
              if isinstance(rec.get("n"), int)]
        eval_n = max(ns) if ns else None
    rl_steps = meta.get("rl_steps")
    rl_by_arm = {}
    if isinstance(rl_steps, dict):
        rl_by_arm = {a: int(v) for a, v in rl_steps.items() if v is not None}
        rl_steps = None
    return RunData(
        run_dir=run.run_dir,
        recipe=str(meta.get("recipe") or run.run_dir.resolve().name),
        arms=arms,
        benchmarks=benchmarks,
        eval_n=int(eval_n) if eval_n is not None else None,
        sft_steps=sft_steps,
        rl_steps=int(rl_steps) if rl_steps is not None else None,
        config=meta.get("config") or {},
        sft_metrics=sft_metrics,
        rl_metrics=rl_metrics,
        evals=evals,
        eval_files=eval_files,
        rl_steps_by_arm=rl_by_arm,
        base_evals=base_evals,
        base_eval_files=base_eval_files,
        seed=seed,
    )
