"""The stages of one recipe as a small DAG, and what each stage does.

Per arm: ``sft`` (skipped for an arm without objective) -> ``eval:after_sft`` -> ``rl`` ->
``eval:rl_step_N`` ... -> ``eval:after_rl``. ``eval:before_sft`` of the base model is shared
by all arms (it is the same model) and copied into each arm's directory.

Every stage has a *key*: a hash of the settings it reads plus the keys of the stages it
depends on. A finished stage writes ``DONE`` holding its key; a stage whose ``DONE`` key
matches is skipped, so a changed setting reruns exactly the stages that depend on it.
A stage that started with the same key and did not finish resumes from its checkpoints;
one that started with another key is cleared and starts again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASE_EVAL = "_base"  # run_dir/_base/eval/before_sft: the shared evaluation of the starting model


@dataclass
class Stage:
    name: str  # e.g. "eksft/sft", "eksft/eval:after_sft"
    arm: str
    kind: str  # sft | rl | eval
    out_dir: Path
    settings: dict[str, Any]  # everything the stage reads, hashed into its key
    deps: list[str] = field(default_factory=list)
    key: str = ""

    def done(self) -> bool:
        marker = self.out_dir / "DONE"
        return marker.is_file() and json.loads(marker.read_text()).get("key") == self.key


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def eval_points(rl_steps: int, every: int) -> list[tuple[str, int | None]]:
    """(point name, RL step whose checkpoint it evaluates) after SFT; None = the final RL model."""
    points = [(f"rl_step_{s}", s) for s in range(every, rl_steps, every)] if every else []
    return points + [("after_rl", None)]


KINDS = ("sft", "rl", "eval")


def stage_precision(recipe, arm, kind: str, hardware) -> dict:
    """The precision settings a stage of ``kind`` reads, resolved on ``hardware`` (``rl.common.precision.Precision`` each).

    Resolved values, not the ``auto`` written in the recipe, go into the stage keys: a finished stage is not
    reused by a run whose workers resolve ``auto`` differently.
    """
    from rl.common.precision import resolve_bf16, resolve_dtype

    if kind == "sft":
        return {"sft.bf16": resolve_bf16(recipe.sft.bf16, hardware=hardware)}
    engine = {"rollout.dtype": resolve_dtype(recipe.rollout.dtype, hardware=hardware)}
    if kind == "rl":
        rl = recipe.arm_rl(arm) if arm is not None else recipe.rl
        return {"rl.bf16": resolve_bf16(rl.bf16, hardware=hardware), **engine}
    return engine


def resolved_dtypes(precision: dict) -> dict[str, str]:
    return {key: p.dtype for key, p in precision.items()}


def plan(recipe, run_dir: Path, hardware: dict | None = None) -> list[Stage]:
    """All stages of the recipe, dependencies first, keys computed.

    ``hardware``: ``{kind: rl.common.precision.Hardware}`` of the workers that run each kind of stage (default: this
    machine), to resolve the ``auto`` precisions. One run computes every arm at one precision: arms whose RL
    settings resolve differently (an arm overriding ``rl.bf16``) are refused.
    """
    from eksft.config import RecipeError
    from rl.common.precision import detect_hardware

    if hardware is None:
        here = detect_hardware()
        hardware = {kind: here for kind in KINDS}

    def precision(arm, kind: str) -> dict[str, str]:
        return resolved_dtypes(stage_precision(recipe, arm, kind, hardware[kind]))

    per_arm = {arm.name: precision(arm, "rl")["rl.bf16"] for arm in recipe.arms}
    if len(set(per_arm.values())) > 1:
        raise RecipeError(f"the arms would train RL at different precisions ({', '.join(f'{a}: {d}' for a, d in per_arm.items())}): "
                          "a comparison needs one; set rl.bf16 in the recipe's rl section, not in an arm's rl overrides")
    base = {
        "model": recipe.model.model_dump(mode="json"),
        "seed": recipe.seed,
        "prompting": {"instruction": recipe.data.instruction, "system_prompt": recipe.data.system_prompt},
    }
    evaluation = {"eval": recipe.eval.model_dump(mode="json"), "rollout": recipe.rollout.model_dump(mode="json"), **base}
    stages: list[Stage] = [Stage(f"{BASE_EVAL}/eval:before_sft", BASE_EVAL, "eval",
                                 run_dir / BASE_EVAL / "eval" / "before_sft",
                                 {**evaluation, "point": "before_sft", "precision": precision(None, "eval")})]
    for arm in recipe.arms:
        arm_dir = run_dir / arm.name
        start_dep = stages[0].name
        if arm.objective is not None:
            sft_settings = {**base, "data": recipe.data.model_dump(mode="json"),
                            "sft": {**recipe.sft.model_dump(mode="json"), "objective": arm.objective.model_dump(mode="json")},
                            "precision": precision(arm, "sft")}
            stages.append(Stage(f"{arm.name}/sft", arm.name, "sft", arm_dir / "sft", sft_settings))
            stages.append(Stage(f"{arm.name}/eval:after_sft", arm.name, "eval", arm_dir / "eval" / "after_sft",
                                {**evaluation, "point": "after_sft", "precision": precision(arm, "eval")},
                                deps=[f"{arm.name}/sft"]))
            start_dep = f"{arm.name}/sft"
        rl_cfg = recipe.arm_rl(arm)
        stages.append(Stage(f"{arm.name}/rl", arm.name, "rl", arm_dir / "rl",
                            {**base, "data_rl": recipe.data.rl.model_dump(mode="json"),
                             "rl": rl_cfg.model_dump(mode="json"), "rollout": recipe.rollout.model_dump(mode="json"),
                             "precision": precision(arm, "rl")},
                            deps=[start_dep]))
        for point, _step in eval_points(rl_cfg.steps, recipe.eval.every_rl_steps):
            stages.append(Stage(f"{arm.name}/eval:{point}", arm.name, "eval", arm_dir / "eval" / point,
                                {**evaluation, "point": point, "precision": precision(arm, "eval")},
                                deps=[f"{arm.name}/rl"]))
    by_name = {s.name: s for s in stages}
    for s in stages:  # in dependency order, so upstream keys exist
        s.key = stable_hash({"settings": s.settings, "deps": [by_name[d].key for d in s.deps]})
    return stages


# --------------------------------------------------------------------------- execution of one stage


def run_stage(stage: Stage, recipe_json: dict, run_dir: str, *, num_threads: int | None = None) -> dict:
    """Run (or skip, or resume) one stage; returns a small summary. Safe to call in a Ray task."""
    import torch

    from eksft.config import Recipe

    if num_threads:
        torch.set_num_threads(max(1, int(num_threads)))
    if stage.done():
        return {"stage": stage.name, "status": "skipped"}
    recipe = Recipe.model_validate(recipe_json)
    precision = _check_precision(stage, recipe)
    _prepare_dir(stage)
    started = time.time()
    RUNNERS[stage.kind](stage, recipe, Path(run_dir))
    (stage.out_dir / "DONE").write_text(json.dumps({"key": stage.key, "finished": time.time(),
                                                    "seconds": round(time.time() - started, 1),
                                                    "precision": precision}))
    return {"stage": stage.name, "status": "done", "seconds": round(time.time() - started, 1)}


def _check_precision(stage: Stage, recipe) -> dict:
    """This worker's resolution of the stage's precision settings; it must be the one the run was planned with."""
    from rl.common.precision import detect_hardware

    arm = None if stage.arm == BASE_EVAL else _arm(recipe, stage.arm)
    here = stage_precision(recipe, arm, stage.kind, detect_hardware())
    planned = stage.settings["precision"]
    if resolved_dtypes(here) != planned:
        got = ", ".join(f"{k}={p.setting} -> {p.dtype} ({p.hardware.describe()})" for k, p in here.items())
        raise RuntimeError(f"{stage.name}: this worker resolves {got}, but the run was planned with {planned}: the "
                           "cluster's workers differ; set these keys explicitly so that every arm computes alike")
    return {key: p.as_dict() for key, p in here.items()}


def _prepare_dir(stage: Stage) -> None:
    """Keep a partial run with the same key (it resumes); clear one that was started with other settings."""
    started = stage.out_dir / "STARTED"
    if stage.out_dir.exists():
        same = started.is_file() and json.loads(started.read_text()).get("key") == stage.key
        if not same:
            shutil.rmtree(stage.out_dir)
    stage.out_dir.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps({"key": stage.key, "started": time.time()}))


def _arm(recipe, name: str):
    return next(a for a in recipe.arms if a.name == name)


def _start_model(recipe, run_dir: Path, arm) -> str:
    from eksft.models import resolve_model_dir

    if arm.objective is None:
        return resolve_model_dir(recipe.model.name)
    return str(run_dir / arm.name / "sft" / "checkpoint")


def _run_sft(stage: Stage, recipe, run_dir: Path) -> None:
    from eksft.inspect_masks import run_inspect
    from eksft.sft import launch_sft

    arm_recipe = recipe.for_arm(stage.arm)
    final = launch_sft(arm_recipe, stage.out_dir)
    run_inspect(arm_recipe, 5, str(final), stage.out_dir / "masks.html", terminal=False)


def _run_rl(stage: Stage, recipe, run_dir: Path) -> None:
    from eksft.data import load_prompt_answer_rows
    from eksft.models import resolve_model_dir
    from eksft.tracking import make_trackers
    from rl.grpo import run_grpo

    arm = _arm(recipe, stage.arm)
    rows = load_prompt_answer_rows(recipe.data, recipe.data.rl)
    sft_steps = _sft_steps(run_dir / arm.name / "sft")
    trackers = make_trackers(recipe.report_to, stage.out_dir / "tb", f"{recipe.name}-{arm.name}-rl",
                             recipe.model_dump(mode="json"), step_offset=sft_steps)
    # KL is measured to the base model in both phases (one timeline per arm).
    run_grpo(_start_model(recipe, run_dir, arm), rows, recipe.arm_rl(arm), stage.out_dir, rollout=recipe.rollout,
             reference_dir=resolve_model_dir(recipe.model.name), trust_remote_code=recipe.model.trust_remote_code,
             trackers=trackers)


def _run_eval(stage: Stage, recipe, run_dir: Path) -> None:
    from eksft.eval import evaluate
    from eksft.models import resolve_model_dir

    point = stage.settings["point"]
    if stage.arm == BASE_EVAL:
        model = resolve_model_dir(recipe.model.name)
    else:
        arm = _arm(recipe, stage.arm)
        if point == "after_sft":
            model = _start_model(recipe, run_dir, arm)
        elif point == "after_rl":
            model = str(run_dir / arm.name / "rl" / "checkpoint")
        else:
            model = str(run_dir / arm.name / "rl" / "checkpoints" / f"step-{int(point.rsplit('_', 1)[1])}")
    evaluate(model, recipe.eval.benchmarks, recipe.eval, rollout_cfg=recipe.rollout, data_cfg=recipe.data,
             out_dir=stage.out_dir, point=point)


def _sft_steps(sft_dir: Path) -> int:
    metrics = sft_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


RUNNERS: dict[str, Callable[[Stage, Any, Path], None]] = {"sft": _run_sft, "rl": _run_rl, "eval": _run_eval}
