"""The orchestrator: every arm of a recipe through sft -> rl -> evaluations, on Ray or in-process.

    run_pipeline(recipe, run_dir)              # Ray tasks with the CPU/GPU needs the recipe declares
    run_pipeline(recipe, run_dir, local=True)  # the same stages, in this process, in order

Stages are planned in ``eksft.pipeline.plan`` (a DAG keyed by config hashes) and run one by one by
``eksft.pipeline.execute``; each arm's stages are chained, arms are independent, so Ray runs them
concurrently when resources allow.
``RAY_ADDRESS`` points at a cluster; without it Ray starts locally. Rerunning skips finished
stages, reruns those whose settings changed, and resumes interrupted ones.

Hub sources are pinned to the commits they resolve to before planning (``eksft.provenance``), so those commits are
part of the stage keys; ``run.json`` records them with the code's commit, the library versions, the workers'
hardware and the resolved precision.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from pathlib import Path

from eksft.layout import BASE_EVAL, BEFORE_SFT, RunLayout
from eksft.pipeline.execute import run_stage
from eksft.pipeline.plan import KINDS, Stage, plan, stage_precision


def run_pipeline(recipe, run_dir: str | Path | None = None, *, local: bool = False) -> Path:
    run_dir = Path(run_dir) if run_dir else RunLayout.of(recipe.output_dir, recipe.name).run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if not local:
        import ray

        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True)  # honours RAY_ADDRESS
    from eksft.provenance import pin_revisions

    recipe, hub = pin_revisions(recipe)  # planned and run at these commits: they are part of the stage keys
    machines = _stage_machines(recipe, local)
    hardware = {kind: hw for kind, (hw, _) in machines.items()}
    stages = plan(recipe, run_dir, hardware)
    precision = _precision_summary(recipe, hardware)
    provenance = _provenance(hub, {kind: summary for kind, (_, summary) in machines.items()})
    recipe_json = recipe.model_dump(mode="json")
    _write_run_json(recipe, run_dir, precision, provenance)
    todo = [s for s in stages if not s.done()]
    seeds = "" if recipe.seeds is None else f", seeds: {', '.join(map(str, recipe.seeds))}"
    print(f"[run] {recipe.name}: {len(stages)} stages, {len(stages) - len(todo)} already done "
          f"(arms: {', '.join(a.name for a in recipe.arms)}{seeds}) -> {run_dir}", flush=True)
    for kind, settings in precision.items():
        print(f"[run] {kind} precision: " + "; ".join(f"{k}={p['setting']} -> {p['dtype']}" for k, p in settings.items())
              + f" ({_hardware_line(next(iter(settings.values())))})", flush=True)
    for s in stages:
        if s.done():
            _status(s, "skipped (done with the same settings)")
    failures = _run_local(todo, recipe, recipe_json, run_dir) if local else _run_ray(todo, recipe, recipe_json, run_dir)
    _share_base_eval(recipe, run_dir)
    _write_run_json(recipe, run_dir, precision, provenance)
    from eksft.report import build_report

    report = build_report(run_dir)
    print(f"\n{(report / 'table.md').read_text(encoding='utf-8')}\n[run] report: {report / 'index.html'}", flush=True)
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


def _stage_machines(recipe, local: bool) -> dict:
    """``{kind: (Hardware, summary)}`` of the workers that will run each kind of stage (Ray: a probe task with its
    resources; ``eksft.provenance.worker_machine``)."""
    from eksft.provenance import worker_machine

    if local:
        here = worker_machine()
        return {kind: here for kind in KINDS}
    import ray

    probe = ray.remote(worker_machine)
    refs = {kind: probe.options(num_cpus=getattr(recipe.resources, kind).num_cpus,
                                num_gpus=getattr(recipe.resources, kind).num_gpus, max_retries=0).remote()
            for kind in KINDS}
    try:
        return dict(zip(refs, ray.get(list(refs.values()), timeout=600)))
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError("no Ray worker with the resources of the recipe's `resources` section became free within "
                           "600 s (a GPU asked for on a cluster without one?)") from None


def _precision_summary(recipe, hardware: dict) -> dict:
    """What run.json records: per stage kind, each precision setting as written, resolved, and why."""
    arm = recipe.arms[0] if recipe.arms else None  # plan() has checked that every arm's RL resolves alike
    return {kind: {key: p.as_dict() for key, p in stage_precision(recipe, arm, kind, hardware[kind]).items()}
            for kind in KINDS}


def _hardware_line(p: dict) -> str:
    return f"{p['device']} {p['capability']}" + (f" [{p['units']}]" if p["units"] else "") + f": {p['reason']}"


def _run_ray(todo: list[Stage], recipe, recipe_json: dict, run_dir: Path) -> list[str]:
    """Start each stage once its inputs are done and the cluster has room for it, longest chain first.

    Submitting everything at once would let Ray start ready stages in the order they became ready: the base
    model's evaluation (ready at once, needed by nothing) then delays a whole arm, and on a small machine the
    other arm ends alone on an idle cluster. Starting the stage with the longest chain behind it first keeps
    every arm moving; the evaluations fill the gaps.
    """
    import ray

    # max_calls=1: each stage in a fresh worker process; a reused one kept the previous stage's heap (an RL stage
    # after an SFT stage in one process held 11.9 GB, and Ray's OOM monitor killed the next stages)
    remote_stage = ray.remote(max_calls=1)(_ray_stage)
    order = launch_order(todo)
    waiting = {s.name: s for s in todo}
    running: dict[object, Stage] = {}
    finished: set[str] = set()
    failed: list[str] = []
    capacity = ray.cluster_resources()
    started = time.time()
    gpu_cluster = capacity.get("GPU", 0) > 0
    needs = {s.name: stage_needs(recipe, s, gpu_cluster) for s in todo}  # once each: an RL stage's validates its arm's settings
    for s in todo:  # engine actors that can never all be placed would leave their stage waiting forever
        engine_cpus, _ = engine_needs(recipe, s)
        if recipe.rollout.num_cpus is not None and engine_cpus and needs[s.name][0] > capacity.get("CPU", 0) + 1e-9:
            raise ValueError(f"{s.name} needs {needs[s.name][0]:g} CPUs (its own {needs[s.name][0] - engine_cpus:g} + "
                             f"{recipe.rollout.num_engines} engines x rollout.num_cpus {recipe.rollout.num_cpus:g}) but "
                             f"the Ray cluster has {capacity.get('CPU', 0):g}: leave rollout.num_cpus unset (the "
                             "engines share the stage's CPUs), lower it, or lower rollout.num_engines")
    while waiting or running:
        for stage in [s for s in order if s.name in waiting]:  # upstream failures first: nothing to wait for
            if any(d in failed for d in stage.deps):
                del waiting[stage.name]
                failed.append(stage.name)
                _status(stage, "not run (an upstream stage failed)")
        for stage in [s for s in order if s.name in waiting]:
            if any(d in waiting or d in {r.name for r in running.values()} for d in stage.deps):
                continue
            cpus, gpus, memory = needs[stage.name]
            used = [sum(needs[r.name][i] for r in running.values()) for i in range(3)]
            fits = all(u + n <= capacity.get(resource, 0) + 1e-9
                       for u, n, resource in zip(used, (cpus, gpus, memory), ("CPU", "GPU", "memory")) if n)
            if not fits and running:
                continue  # when nothing runs, start it anyway: Ray reports what it is waiting for
            # the engines are admitted with the stage but hold their own reservations: the stage's task holds the rest
            engine_cpus, engine_gpus = engine_needs(recipe, stage)
            own_cpus = cpus - engine_cpus
            threads = cpus if recipe.rollout.num_cpus is None else own_cpus  # shared engines: the stage's threads
            ref = remote_stage.options(num_cpus=own_cpus, num_gpus=gpus - engine_gpus, name=stage.name,
                                       max_retries=0).remote(stage, recipe_json, str(run_dir), threads)
            running[ref] = waiting.pop(stage.name)
            _status(stage, "started")
        if not running:
            break
        (ref,), _ = ray.wait(list(running), num_returns=1)
        stage = running.pop(ref)
        try:
            result = ray.get(ref)
            finished.add(stage.name)
            _status(stage, f"done in {result.get('seconds', 0)} s "
                           f"[{len(finished) + len(failed)}/{len(todo)} stages, {time.time() - started:.0f} s]")
            if stage.arm == BASE_EVAL:
                _share_base_eval(recipe, run_dir)
        except Exception as e:
            failed.append(stage.name)
            cause = getattr(e, "cause", None) or e
            _status(stage, f"FAILED: {type(cause).__name__}: {str(cause).splitlines()[-1] if str(cause) else ''}")
    return failed


def stage_needs(recipe, stage: Stage, gpu_cluster: bool = False) -> tuple[float, float, float]:
    """(CPUs, GPUs, bytes of host memory) that ``stage`` holds while it runs, from the recipe's ``resources``.

    The memory is the stage's ``memory_gib`` plus, for an SFT stage with ``sft.workers`` > 1 or an RL stage with
    ``rl.workers`` > 1 (the arm's value),
    ``worker_memory_gib`` per Ray trainer worker: a stage and its workers are admitted as one, so two stages can
    never each hold their own share while waiting for their workers' (that would wait forever). Likewise
    ``engine_memory_gib`` per engine actor of an RL or evaluation stage whose engines run in Ray actors. The same for
    CPUs: the workers run inside the stage's CPUs (`rl.grpo.trainer`: a token share each) unless
    ``<kind>.worker_cpus`` is set, which is then counted per worker; and for GPUs on a ``gpu_cluster``, one per
    worker. RL and evaluation stages whose engines run in Ray actors (``rollout.num_engines`` > 1, ``placement:
    separate`` or ``use_ray``) also count each engine's GPUs, and its ``rollout.num_cpus`` when set."""
    res = getattr(recipe.resources, stage.kind)
    ray_workers, worker_cpus = 0, 0.0  # workers: 1 runs in the stage's own process
    if stage.kind in ("sft", "rl"):
        settings = recipe.sft if stage.kind == "sft" else recipe.arm_rl(next(a for a in recipe.arms if a.name == stage.arm))
        ray_workers = settings.workers if settings.workers > 1 else 0
        worker_cpus = settings.worker_cpus or 0.0
    gib = (res.memory_gib or 0) + ray_workers * (res.worker_memory_gib or 0)
    # On a cluster with GPUs each Ray worker takes one (rl.workers.workers_device).
    gpus = res.num_gpus + (ray_workers if gpu_cluster else 0)
    engine_cpus, engine_gpus = engine_needs(recipe, stage)
    if stage.kind in ("rl", "eval") and recipe.rollout.in_ray_actors:
        gib += recipe.rollout.num_engines * (res.engine_memory_gib or 0)
    if recipe.rollout.num_cpus is None:
        engine_cpus = 0.0  # token shares, taken out of the stage's own CPUs (see `engine_needs`)
    return res.num_cpus + ray_workers * worker_cpus + engine_cpus, gpus + engine_gpus, gib * 2**30


def engine_needs(recipe, stage: Stage) -> tuple[float, float]:
    """(CPUs, GPUs) that the engine actors of an RL or evaluation stage reserve in Ray (none when its engine runs
    in the stage's process). The engines reserve them themselves (`rl.rollout.ray_engine.RayEngine`): the stage's
    own task holds the rest. With ``rollout.num_cpus`` unset each engine reserves a token share
    (`rl.common.cpu_share`) that comes out of the stage's own CPUs."""
    from rl.common.cpu_share import TOKEN_CPU

    rollout = recipe.rollout
    if stage.kind not in ("rl", "eval") or not rollout.in_ray_actors:
        return 0.0, 0.0
    per_engine = TOKEN_CPU if rollout.num_cpus is None else rollout.num_cpus
    return rollout.num_engines * per_engine, rollout.num_engines * rollout.num_gpus * rollout.tensor_parallel_size


def launch_order(stages: list[Stage]) -> list[Stage]:
    """Stages by the length of the longest chain of stages that waits on them (themselves included), longest
    first; among equals trainers (sft, rl) before evaluations, the base model's evaluation (the longest: the
    base model answers at length) first among evaluations, then plan order."""
    below: dict[str, list[str]] = {s.name: [] for s in stages}
    for s in stages:
        for d in s.deps:
            if d in below:
                below[d].append(s.name)
    chain: dict[str, int] = {}

    def length(name: str) -> int:
        if name not in chain:
            chain[name] = 1 + max((length(b) for b in below[name]), default=0)
        return chain[name]

    position = {s.name: i for i, s in enumerate(stages)}
    return sorted(stages, key=lambda s: (-length(s.name), s.kind == "eval", s.arm != BASE_EVAL, position[s.name]))


def _ray_stage(stage: Stage, recipe_json: dict, run_dir: str, num_cpus: float) -> dict:
    return run_stage(stage, recipe_json, run_dir, num_threads=num_cpus)


def _share_base_eval(recipe, run_dir: Path) -> None:
    """Copy the base model's evaluation into every arm's eval/before_sft (one computation, one layout), per seed."""
    layout = RunLayout(run_dir)
    for seed in recipe.run_seeds:
        src = layout.base(seed).eval(BEFORE_SFT)
        if not src.done_marker.is_file():
            continue
        for arm in recipe.arms:
            dst = layout.arm(arm.name, seed).eval(BEFORE_SFT).root
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.root.glob("*.json"):
                shutil.copy2(f, dst / f.name)


def _provenance(hub: dict, machines: dict) -> dict:
    """What produced the run: the code's commit, the libraries, the hub commits, the workers' hardware."""
    from eksft.provenance import git_state, package_versions

    return {"git": git_state(), "versions": package_versions(), "python": platform.python_version(),
            "platform": platform.platform(), "hub": hub, "hardware": machines}


def _write_run_json(recipe, run_dir: Path, precision: dict, provenance: dict) -> None:
    layout = RunLayout(run_dir)
    info = {
        "provenance": provenance,
        "precision": precision,
        "recipe": recipe.name,
        "arms": [a.name for a in recipe.arms],
        "seeds": recipe.seeds,  # null: one run, no seed level in the layout
        "benchmarks": list(recipe.eval.benchmarks),
        "eval_n": recipe.eval.n,
        "sft_global_batch": {"workers": recipe.sft.workers, "batch_size": recipe.sft.batch_size,
                             "grad_accum": recipe.sft.grad_accum, "global_batch": recipe.sft.sequences_per_step()},
        "sft_steps": {a.name: max(layout.arm(a.name, seed).sft.logged_steps() for seed in recipe.run_seeds)
                      for a in recipe.arms},
        "rl_steps": {a.name: recipe.arm_rl(a).steps for a in recipe.arms},
        "config": recipe.model_dump(mode="json"),
        "command": " ".join(sys.argv),
    }
    layout.run_json.write_text(json.dumps(info, indent=2))
