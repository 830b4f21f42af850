"""``sft_step.py --loops``: whole cold-start optimizer steps, the trainer loop against the HF Trainer it replaced.

Systems (one objective each run, ``sft`` or ``eksft``, on the recipe's real data path: the embedded arithmetic
rows through the chat template, batches of ``--batch``, one micro-batch per step, the KL metric off in the timed
steps):

* ``loop``: ``eksft.sft.run_sft`` with ``sft.workers: 1`` (the trainer worker group in this process: FSDP2 over one
  rank, the objective per micro-batch, AdamW, the schedule, metrics.jsonl);
* ``hf``: the previous path, ``benchmarks/hf_trainer_baseline.py`` (transformers' Trainer with the objective in
  ``compute_loss``).

Each (system, objective) runs in its own subprocess, and the runs go round-robin (``--rounds`` times
hf-sft, loop-sft, hf-eksft, loop-eksft) so that background load hits them alike. A step's time is the wall time
from the end of one optimizer step to the end of the next (both systems: the data, forward(s), backward, clipping,
the optimizer, logging); the ``--warmup`` first steps and the last (the final save) are not timed. Ratios:
``loop / hf`` per objective (the issue's bound: <= 1.05) and ``eksft / sft`` per system (<= 1.35).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SYSTEMS = ("hf", "loop")
OBJECTIVES = ("sft", "eksft")


def recipe_overrides(args) -> list[str]:
    total = args.warmup + args.steps + 1
    return [f"model.name={args.model}", "data.sft.source=embedded:arithmetic",
            f"data.sft.num_examples={args.batch * total}", "data.max_length=256", f"sft.batch_size={args.batch}",
            "sft.grad_accum=1", f"sft.max_steps={total}", "sft.save_steps=1000000", "sft.kl_metric_every=1000",
            "sft.logging_steps=1", "sft.warmup_ratio=0", "sft.lr_scheduler=constant", "sft.learning_rate=1e-5",
            f"sft.bf16={str(bool(args.bf16)).lower()}", f"seed={args.seed}",
            "arms=[{name: sft, objective: {name: sft}}, {name: eksft, objective: {name: eksft, ratio: 0.2}}]"]


def run_one(args, system: str, objective: str) -> dict[str, Any]:
    """In this process: train ``warmup + steps + 1`` steps; the times between the ends of consecutive steps."""
    import torch

    from eksft.config import load_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(None, recipe_overrides(args))
    settings = recipe.arm(objective).objective
    ends: list[float] = []
    with tempfile.TemporaryDirectory(prefix="sft_loops_") as tmp:
        if system == "loop":
            from eksft.layout import SFTStageDir
            from eksft.sft import run_sft

            run_sft(recipe, settings, SFTStageDir(Path(tmp)), on_step=lambda step, metrics: ends.append(time.perf_counter()))
        else:
            from transformers import TrainerCallback

            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from hf_trainer_baseline import hf_train

            class StepEnds(TrainerCallback):
                def on_step_end(self, *a, **kw):
                    ends.append(time.perf_counter())

            hf_train(recipe, settings, Path(tmp), callbacks=[StepEnds()])
    times = [b - a for a, b in zip(ends, ends[1:])]  # times[i]: step i + 2
    timed = times[args.warmup - 1:-1] if args.warmup >= 1 else times[:-1]
    return {"system": system, "objective": objective, "status": "ok", "step_times": timed, "steps_seen": len(ends)}


def run_child(args, system: str, objective: str, timeout: float | None) -> dict[str, Any]:
    here = Path(__file__).resolve().parent
    cmd = [sys.executable, "-c", "import sys, json, argparse; sys.path.insert(0, sys.argv[1]); import _sft_loops as m; "
           "a = argparse.Namespace(**json.loads(sys.argv[2])); print('RESULT ' + json.dumps(m.run_one(a, sys.argv[3], sys.argv[4])))",
           str(here), json.dumps(vars(args)), system, objective]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(here.parent), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"system": system, "objective": objective, "status": "timeout"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"system": system, "objective": objective, "status": "failed", "error": proc.stderr[-2000:]}
    return json.loads(lines[-1].removeprefix("RESULT "))


def run_loops(args) -> dict[str, Any]:
    timeout = args.child_timeout or None
    rows = {(s, o): {"system": s, "objective": o, "status": "ok", "step_times": []} for o in OBJECTIVES for s in SYSTEMS}
    for round_ in range(args.rounds):
        for objective in OBJECTIVES:
            for system in SYSTEMS:
                result = run_child(args, system, objective, timeout)
                row = rows[(system, objective)]
                if result["status"] != "ok":
                    row.update(status=result["status"], error=result.get("error"))
                row["step_times"].extend(result.get("step_times", []))
                print(f"[sft_step --loops] round {round_ + 1}: {system} {objective}: {result['status']}, "
                      f"median {statistics.median(result['step_times']) if result.get('step_times') else float('nan'):.3f} s",
                      flush=True)
    for row in rows.values():
        row["step_time_s_median"] = statistics.median(row["step_times"]) if row["step_times"] else None

    def ratio(num, den):
        a, b = rows[num]["step_time_s_median"], rows[den]["step_time_s_median"]
        return a / b if a and b and rows[num]["status"] == rows[den]["status"] == "ok" else None

    ratios = {f"loop_over_hf_{o}": ratio(("loop", o), ("hf", o)) for o in OBJECTIVES}
    ratios.update({f"eksft_over_sft_{s}": ratio((s, "eksft"), (s, "sft")) for s in SYSTEMS})
    return {"rows": list(rows.values()), "ratios": ratios}


def markdown_table(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [f"# sft_step --loops: {c['model']}, batch {c['batch']}, {c['precision']}, {result['device'].get('name', '')}", "",
             "| system | objective | status | median s/step | steps timed |", "|---|---|---|---:|---:|"]
    for row in result["rows"]:
        median = row.get("step_time_s_median")
        lines.append(f"| {row['system']} | {row['objective']} | {row['status']} | "
                     f"{'-' if median is None else f'{median:.3f}'} | {len(row['step_times'])} |")
    lines += ["", "| ratio | value | bound |", "|---|---:|---|"]
    bounds = {"loop_over_hf": "<= 1.05", "eksft_over_sft": "<= 1.35"}
    for name, value in result["ratios"].items():
        bound = next(b for prefix, b in bounds.items() if name.startswith(prefix))
        lines.append(f"| {name} | {'-' if value is None else f'{value:.3f}'} | {bound} |")
    return "\n".join(lines) + "\n"
