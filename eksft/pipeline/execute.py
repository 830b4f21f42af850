"""Running one planned stage: skip it when done, resume or clear a partial one, check the worker's precision,
call the stage function (``eksft.stages``) and write ``DONE``. Safe to call in a Ray task."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eksft.layout import BASE_EVAL, RunLayout
from eksft.pipeline.plan import Stage, resolved_dtypes, stage_precision


def run_stage(stage: Stage, recipe_json: dict, run_dir: str, *, num_threads: int | None = None) -> dict:
    """Run (or skip, or resume) one stage; returns a small summary."""
    import torch

    from eksft.config import Recipe

    if num_threads:
        torch.set_num_threads(max(1, int(num_threads)))
    if stage.done():
        return {"stage": stage.name, "status": "skipped"}
    recipe = Recipe.model_validate(recipe_json).for_seed(stage.seed)
    precision = _check_precision(stage, recipe)
    _prepare_dir(stage)
    started = time.time()
    RUNNERS[stage.kind](stage, recipe, RunLayout(Path(run_dir)))
    stage.out.done_marker.write_text(json.dumps({"key": stage.key, "finished": time.time(),
                                                 "seconds": round(time.time() - started, 1),
                                                 "precision": precision}))
    return {"stage": stage.name, "status": "done", "seconds": round(time.time() - started, 1)}


def _stage_arm(stage: Stage, recipe):
    """The stage's arm (None for the base model's shared evaluation)."""
    return None if stage.arm == BASE_EVAL else recipe.arm(stage.arm)


def _check_precision(stage: Stage, recipe) -> dict:
    """This worker's resolution of the stage's precision settings; it must be the one the run was planned with."""
    from rl.common.precision import detect_hardware

    here = stage_precision(recipe, _stage_arm(stage, recipe), stage.kind, detect_hardware())
    planned = stage.settings["precision"]
    if resolved_dtypes(here) != planned:
        got = ", ".join(f"{k}={p.setting} -> {p.dtype} ({p.hardware.describe()})" for k, p in here.items())
        raise RuntimeError(f"{stage.name}: this worker resolves {got}, but the run was planned with {planned}: the "
                           "cluster's workers differ; set these keys explicitly so that every arm computes alike")
    return {key: p.as_dict() for key, p in here.items()}


def _prepare_dir(stage: Stage) -> None:
    """Keep a partial run with the same key (it resumes); clear one that was started with other settings."""
    root, started = stage.out.root, stage.out.started_marker
    if root.exists():
        same = started.is_file() and json.loads(started.read_text()).get("key") == stage.key
        if not same:
            shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps({"key": stage.key, "started": time.time()}))


def _run_sft(stage: Stage, recipe, layout: RunLayout) -> None:
    from eksft.stages import sft_stage

    sft_stage(recipe, recipe.arm(stage.arm), stage.out)


def _run_rl(stage: Stage, recipe, layout: RunLayout) -> None:
    from eksft.stages import arm_start_model, rl_stage

    arm, arm_dir = recipe.arm(stage.arm), layout.arm(stage.arm, stage.seed)
    rl_stage(recipe, arm, arm_start_model(recipe, arm, arm_dir), stage.out, step_offset=arm_dir.sft.logged_steps())


def _run_eval(stage: Stage, recipe, layout: RunLayout) -> None:
    from eksft.stages import eval_stage, model_at

    model = model_at(recipe, _stage_arm(stage, recipe), layout.arm(stage.arm, stage.seed), stage.point)
    eval_stage(recipe, model, stage.out.root, stage.point.name)


RUNNERS: dict[str, Callable[[Stage, Any, RunLayout], None]] = {"sft": _run_sft, "rl": _run_rl, "eval": _run_eval}
