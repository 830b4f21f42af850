"""The orchestrator: every arm of a recipe through sft -> rl -> evaluations, on Ray or in-process.

    run_pipeline(recipe, run_dir)              # Ray tasks with the CPU/GPU needs the recipe declares
    run_pipeline(recipe, run_dir, local=True)  # the same stages, in this process, in order

Stages are planned in ``stages.plan`` (a DAG keyed by config hashes); each arm's stages are
chained, arms are independent, so Ray runs them concurrently when resources allow.
``RAY_ADDRESS`` points at a cluster; without it Ray starts locally. Rerunning skips finished
stages, reruns those whose settings changed, and resumes interrupted ones.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from eksft.pipeline.stages import BASE_EVAL, Stage, plan, run_stage

__all__ = ["plan", "run_pipeline"]


def run_pipeline(recipe, run_dir: str | Path | None = None, *, local: bool = False) -> Path:
    run_dir = Path(run_dir or Path(recipe.output_dir) / recipe.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = plan(recipe, run_dir)
    recipe_json = recipe.model_dump(mode="json")
    _write_run_json(recipe, run_dir)
    todo = [s for s in stages if not s.done()]
    print(f"[run] {recipe.name}: {len(stages)} stages, {len(stages) - len(todo)} already done "
          f"(arms: {', '.join(a.name for a in recipe.arms)}) -> {run_dir}", flush=True)
    for s in stages:
        if s.done():
            _status(s, "skipped (done with the same settings)")
    failures = _run_local(todo, recipe, recipe_json, run_dir) if local else _run_ray(todo, recipe, recipe_json, run_dir)
    _share_base_eval(recipe, run_dir)
    _write_run_json(recipe, run_dir)
    from eksft.report import build_report, format_table

    report = build_report(run_dir)
    print(f"\n{format_table(run_dir)}\n\n[run] report: {report / 'index.html'}", flush=True)
    if failures:
        raise RuntimeError(f"{len(failures)} stage(s) failed: {', '.join(failures)} (rerun to resume)")
    return run_dir


def _status(stage: Stage, text: str) -> None:
    print(f"[{stage.arm}] {stage.name.split('/', 1)[1]}: {text}", flush=True)


def _run_local(todo: list[Stage], recipe, recipe_json: dict, run_dir: Path) -> list[str]:
    failed: set[str] = set()
    for stage in todo:
        if any(d in failed for d in stage.deps):
            failed.add(stage.name)
            _status(stage, "not run (an upstream stage failed)")
            continue
        _status(stage, "running")
        try:
            result = run_stage(stage, recipe_json, str(run_dir))
        except Exception as e:  # keep the other arms going; the error is reported at the end
            failed.add(stage.name)
            _status(stage, f"FAILED: {type(e).__name__}: {e}")
            continue
        _status(stage, f"done in {result.get('seconds', 0)} s")
        if stage.arm == BASE_EVAL:
            _share_base_eval(recipe, run_dir)
    return sorted(failed)


def _run_ray(todo: list[Stage], recipe, recipe_json: dict, run_dir: Path) -> list[str]:
    import ray

    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True)  # honours RAY_ADDRESS
    remote_stage = ray.remote(_ray_stage)
    refs: dict[str, object] = {}
    for stage in todo:
        res = getattr(recipe.resources, stage.kind)
        upstream = [refs[d] for d in stage.deps if d in refs]
        refs[stage.name] = remote_stage.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, name=stage.name,
                                                max_retries=0).remote(stage, recipe_json, str(run_dir), res.num_cpus,
                                                                      *upstream)
        _status(stage, "queued")
    pending = {ref: name for name, ref in refs.items()}
    by_name = {s.name: s for s in todo}
    failed: list[str] = []
    started = time.time()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(done[0])
        try:
            result = ray.get(done[0])
            _status(by_name[name], f"done in {result.get('seconds', 0)} s "
                                   f"[{len(refs) - len(pending)}/{len(refs)} stages, {time.time() - started:.0f} s]")
            if by_name[name].arm == BASE_EVAL:
                _share_base_eval(recipe, run_dir)
        except Exception as e:
            failed.append(name)
            cause = getattr(e, "cause", None) or e
            _status(by_name[name], f"FAILED: {type(cause).__name__}: {str(cause).splitlines()[-1] if str(cause) else ''}")
    return failed


def _ray_stage(stage: Stage, recipe_json: dict, run_dir: str, num_cpus: float, *upstream) -> dict:
    """A Ray task: ``upstream`` results are passed only so that Ray waits for them."""
    return run_stage(stage, recipe_json, run_dir, num_threads=num_cpus)


def _share_base_eval(recipe, run_dir: Path) -> None:
    """Copy the base model's evaluation into every arm's eval/before_sft (one computation, one layout)."""
    src = run_dir / BASE_EVAL / "eval" / "before_sft"
    if not (src / "DONE").is_file():
        return
    for arm in recipe.arms:
        dst = run_dir / arm.name / "eval" / "before_sft"
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.glob("*.json"):
            shutil.copy2(f, dst / f.name)


def _write_run_json(recipe, run_dir: Path) -> None:
    from eksft.pipeline.stages import _sft_steps

    info = {
        "recipe": recipe.name,
        "arms": [a.name for a in recipe.arms],
        "benchmarks": list(recipe.eval.benchmarks),
        "eval_n": recipe.eval.n,
        "sft_steps": {a.name: _sft_steps(run_dir / a.name / "sft") for a in recipe.arms},
        "rl_steps": {a.name: recipe.arm_rl(a).steps for a in recipe.arms},
        "config": recipe.model_dump(mode="json"),
        "command": " ".join(sys.argv),
    }
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))
