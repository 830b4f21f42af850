"""Every name and place in a run directory: the writers (stages, trainers, pipeline) and the readers (report) use this.

    <run_dir>/run.json
    <run_dir>/report/{table.md, table.csv, *.png, index.html}
    <run_dir>/<arm>/sft/{checkpoint/, checkpoints/, metrics.jsonl, masks.html, sft_recipe.yaml, STARTED, DONE}
    <run_dir>/<arm>/rl/{checkpoint/, checkpoints/step-N/, rollouts/step-N.jsonl, metrics.jsonl, tb/, STARTED, DONE}
    <run_dir>/<arm>/eval/<point>/{<benchmark_filename(benchmark)>, STARTED, DONE}
    <run_dir>/_base/eval/before_sft/   the base model's evaluation, copied into every arm's eval/before_sft

A recipe with ``seeds`` runs every arm once per seed, each in its own directory with the layout above:
``<run_dir>/<arm>/seed-<s>/{sft,rl,eval}/`` and ``<run_dir>/_base/seed-<s>/eval/before_sft/``; a recipe without
``seeds`` has no seed level. ``RunLayout(run_dir).arm(name, seed)`` is the one place that puts an arm (and a seed)
in the run directory. Evaluation points are ``EvalPoint`` values (``before_sft``, ``after_sft``,
``rl_step_<N>`` carrying N, ``after_rl``); on the run's single timeline (SFT steps, then RL steps) they sit at
:func:`point_step`. The trainers do not import this module: ``run_sft`` takes an ``SFTStageDir`` and the GRPO
trainer an ``rl.grpo.outputs.GRPOOutputs`` built by :meth:`RLStageDir.trainer_outputs`.

Standard library only (and the rl dataclass above): the evaluation, pipeline and report code import it freely.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from rl.grpo.outputs import GRPOOutputs

RUN_JSON = "run.json"
REPORT_DIR = "report"
METRICS_FILE = "metrics.jsonl"
MASKS_FILE = "masks.html"
DONE_FILE = "DONE"
STARTED_FILE = "STARTED"
BASE_EVAL = "_base"  # not an arm: the shared evaluation of the starting model ("_..." arm names are reserved)
SFT_DIR, RL_DIR, EVAL_DIR = "sft", "rl", "eval"  # an arm's subdirectories, one per kind of stage
CHECKPOINT_DIR = "checkpoint"  # a stage's final model
CHECKPOINTS_DIR = "checkpoints"  # a stage's resumable checkpoints
RL_STEP_PREFIX = "step"  # rl/checkpoints/step-N, rl/rollouts/step-N.jsonl
SEED_PREFIX = "seed-"  # <arm>/seed-<s>/ when the recipe lists seeds
_SEED_DIR = re.compile(r"^seed-(\d+)$")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


# --------------------------------------------------------------------------- evaluation points


@dataclass(frozen=True)
class EvalPoint:
    """Where on an arm's timeline a model is evaluated; ``rl_step``: the RL step whose checkpoint it reads."""

    name: str
    rl_step: int | None = None


BEFORE_SFT = EvalPoint("before_sft")
AFTER_SFT = EvalPoint("after_sft")
AFTER_RL = EvalPoint("after_rl")
_FIXED_POINTS = {p.name: p for p in (BEFORE_SFT, AFTER_SFT, AFTER_RL)}
_RL_STEP_NAME = re.compile(r"^rl_step_(\d+)$")


def rl_step_point(step: int) -> EvalPoint:
    """The evaluation after RL step ``step``: ``rl_step_point(20) == EvalPoint("rl_step_20", 20)``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"RL step must be a non-negative int, got {step!r}")
    return EvalPoint(f"rl_step_{step}", step)


def parse_point(name: str) -> EvalPoint | None:
    """The point named ``name`` (a directory name read back from disk), or None for any other name."""
    if name in _FIXED_POINTS:
        return _FIXED_POINTS[name]
    m = _RL_STEP_NAME.match(name)
    return rl_step_point(int(m.group(1))) if m else None


def is_point(name: str) -> bool:
    return parse_point(name) is not None


def eval_points(rl_steps: int, every: int) -> list[EvalPoint]:
    """The points after SFT: every ``every`` RL steps (0: none) before the last, then ``after_rl``."""
    steps = range(every, rl_steps, every) if every else ()
    return [rl_step_point(s) for s in steps] + [AFTER_RL]


def point_step(point: str, sft_steps: int, rl_steps: int | None) -> int:
    """x position of an evaluation point on the arm's timeline (SFT steps, then RL steps).

    ``before_sft -> 0``, ``after_sft -> sft_steps``, ``rl_step_N -> sft_steps + N``,
    ``after_rl -> sft_steps + rl_steps``. An arm without SFT has ``sft_steps == 0``.
    """
    if sft_steps < 0:
        raise ValueError(f"sft_steps must be >= 0, got {sft_steps}")
    parsed = parse_point(point)
    if parsed is None:
        raise ValueError(f"unknown evaluation point {point!r} "
                         "(expected before_sft, after_sft, rl_step_<N> or after_rl)")
    if parsed == BEFORE_SFT:
        return 0
    if parsed == AFTER_SFT:
        return sft_steps
    if parsed == AFTER_RL:
        if rl_steps is None:
            raise ValueError("after_rl needs the number of RL steps")
        return sft_steps + rl_steps
    return sft_steps + parsed.rl_step


def point_sort_key(point: str) -> tuple[int, int]:
    """Chronological order: before_sft < after_sft < rl_step_1 < rl_step_2 < ... < after_rl < unknown."""
    parsed = parse_point(point)
    if parsed is None:
        return (4, 0)
    if parsed.rl_step is not None:
        return (2, parsed.rl_step)
    return {BEFORE_SFT: (0, 0), AFTER_SFT: (1, 0), AFTER_RL: (3, 0)}[parsed]


# --------------------------------------------------------------------------- benchmark result files


def benchmark_filename(name: str) -> str:
    """File name of a benchmark's result JSON: the name's last path component without its file suffix, every
    character outside ``[A-Za-z0-9._-]`` (and a leading ``.``) replaced by ``_``, plus ``.json``.

    ``"gsm8k" -> "gsm8k.json"``, ``"embedded:arithmetic" -> "embedded_arithmetic.json"``,
    ``"../data/gsm8k_test.jsonl" -> "gsm8k_test.json"``. Two benchmarks of one evaluation must not share a file:
    :func:`check_distinct_result_files` refuses them.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"benchmark name must be a non-empty string, got {name!r}")
    path = Path(name)
    stem = path.stem if path.suffix else path.name or name
    safe = _UNSAFE.sub("_", stem)
    return ("_" + safe[1:] if safe.startswith(".") else safe) + ".json"


def check_distinct_result_files(names: list[str]) -> None:
    """Raise ValueError naming both benchmarks when two of ``names`` would write the same result file."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(benchmark_filename(name), name)
        if other != name:
            raise ValueError(f"benchmarks {other!r} and {name!r} would both write {benchmark_filename(name)} "
                             "(results are named after the file's stem): rename one of the files")


def result_path(out_dir: str | Path, benchmark: str) -> Path:
    return Path(out_dir) / benchmark_filename(benchmark)


# --------------------------------------------------------------------------- stage directories


@dataclass(frozen=True)
class StageDir:
    """One stage's directory: its outputs, and the markers the pipeline keeps there."""

    root: Path

    @property
    def done_marker(self) -> Path:
        return self.root / DONE_FILE

    @property
    def started_marker(self) -> Path:
        return self.root / STARTED_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    def logged_steps(self) -> int:
        """The highest ``step`` in the stage's metrics (0 when none)."""
        if not self.metrics.is_file():
            return 0
        lines = self.metrics.read_text().splitlines()
        return max((json.loads(line).get("step", 0) for line in lines if line.strip()), default=0)


@dataclass(frozen=True)
class SFTStageDir(StageDir):
    @property
    def checkpoint(self) -> Path:
        """The final model (LoRA merged): loads in transformers and vLLM."""
        return self.root / CHECKPOINT_DIR

    @property
    def checkpoints(self) -> Path:
        """The checkpoint-N directories (sharded state, RNG, step) for resuming."""
        return self.root / CHECKPOINTS_DIR

    @property
    def data_stats(self) -> Path:
        return self.root / "data_stats.json"

    @property
    def batch(self) -> Path:
        """The global batch the stage trained with: workers, per-worker batch, accumulation, their product."""
        return self.root / "batch.json"

    @property
    def masks(self) -> Path:
        return self.root / MASKS_FILE


@dataclass(frozen=True)
class RLStageDir(StageDir):
    @property
    def checkpoint(self) -> Path:
        return self.trainer_outputs().final

    def step_checkpoint(self, step: int) -> Path:
        return self.trainer_outputs().step_checkpoint(step)

    def trainer_outputs(self) -> GRPOOutputs:
        return GRPOOutputs(metrics=self.metrics, rollouts=self.root / "rollouts", checkpoints=self.root / CHECKPOINTS_DIR,
                           final=self.root / CHECKPOINT_DIR, step_prefix=RL_STEP_PREFIX)


@dataclass(frozen=True)
class EvalPointDir(StageDir):
    def result(self, benchmark: str) -> Path:
        return result_path(self.root, benchmark)


# --------------------------------------------------------------------------- the run and its arms


def seed_dir_name(seed: int) -> str:
    """``seed_dir_name(2) == "seed-2"``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"a seed must be an int, got {seed!r}")
    return f"{SEED_PREFIX}{seed}"


def parse_seed_dir(name: str) -> int | None:
    """The seed of a directory named ``seed-<s>``, or None for any other name."""
    m = _SEED_DIR.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ArmDir:
    """One arm's directory at one seed (``<run_dir>/<arm>`` or ``<run_dir>/<arm>/seed-<s>``)."""

    root: Path
    name: str
    seed: int | None = None

    @property
    def sft(self) -> SFTStageDir:
        return SFTStageDir(self.root / SFT_DIR)

    @property
    def rl(self) -> RLStageDir:
        return RLStageDir(self.root / RL_DIR)

    @property
    def evals(self) -> Path:
        """The directory of the arm's evaluation points."""
        return self.root / EVAL_DIR

    def eval(self, point: EvalPoint | str) -> EvalPointDir:
        return EvalPointDir(self.evals / (point if isinstance(point, str) else point.name))


@dataclass(frozen=True)
class RunLayout:
    run_dir: Path

    @classmethod
    def of(cls, output_dir: str | Path, recipe_name: str) -> RunLayout:
        """The default run directory of a recipe: ``<output_dir>/<recipe name>``."""
        return cls(Path(output_dir) / recipe_name)

    def arm(self, name: str, seed: int | None = None) -> ArmDir:
        """Arm ``name``'s directory; at ``seed`` (None: a run without seed level)."""
        root = self.run_dir / name
        return ArmDir(root if seed is None else root / seed_dir_name(seed), name, seed)

    def base(self, seed: int | None = None) -> ArmDir:
        """Where the starting model's evaluation (shared by the arms) is computed, at ``seed``."""
        return self.arm(BASE_EVAL, seed)

    def seeds_on_disk(self) -> list[int | None]:
        """The seeds found in the run directory (``seed-<s>`` under an arm or ``_base``), sorted; ``[None]`` when
        there is no seed level."""
        found = set()
        for d in (p for p in self.run_dir.iterdir() if p.is_dir()) if self.run_dir.is_dir() else ():
            found.update(s for s in (parse_seed_dir(c.name) for c in d.iterdir() if c.is_dir()) if s is not None)
        return sorted(found) if found else [None]

    @property
    def run_json(self) -> Path:
        return self.run_dir / RUN_JSON

    @property
    def report(self) -> Path:
        return self.run_dir / REPORT_DIR

    @property
    def inspect_page(self) -> Path:
        """``eksft inspect-masks``' default page."""
        return self.run_dir / "inspect" / MASKS_FILE

    def arms_on_disk(self) -> list[str]:
        """Arm names found in the run directory (a directory holding a stage's subdirectory), sorted."""
        found = []
        for d in sorted(p for p in self.run_dir.iterdir() if p.is_dir()):
            if d.name == REPORT_DIR or d.name.startswith((".", "_")):  # _base: shared, not an arm
                continue
            levels = [d, *(c for c in d.iterdir() if c.is_dir() and parse_seed_dir(c.name) is not None)]
            if any((level / sub).is_dir() for level in levels for sub in (SFT_DIR, RL_DIR, EVAL_DIR)):
                found.append(d.name)
        return found
