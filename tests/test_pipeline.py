"""The orchestrator on the quickstart-mini recipe: real Ray, real vLLM/HF engines, real math-verify."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eksft.cli import main
from eksft.config import RecipeError, load_recipe
from eksft.layout import RunLayout
from eksft.pipeline import launch_order, plan, run_pipeline, run_stage
from rl.common import precision as precision_module
from rl.common.precision import Hardware, detect_hardware, resolve_bf16

MINI = Path(__file__).parent / "fixtures" / "quickstart_mini.yaml"
NATIVE = Hardware("cpu", "AVX512", "AVX512_BF16+AMX", True, "native bf16 in torch and oneDNN")
EMULATED = Hardware("cpu", "AVX2", "", False, "no AVX512_BF16/AMX: bf16 is emulated")
LOCAL_HF = ["rollout.engine=hf"]  # the cheap engine for the resume/rerun tests; the Ray test uses vLLM


def done_marker(run_dir: Path, stage: str) -> dict:
    arm, name = stage.split("/")
    arm_dir = RunLayout(run_dir).arm(arm)
    stage_dir = {"sft": arm_dir.sft, "rl": arm_dir.rl}.get(name) or arm_dir.eval(name.removeprefix("eval:"))
    return json.loads(stage_dir.done_marker.read_text())


def expected_outputs(run_dir: Path):
    for arm in ("sft", "eksft"):
        assert (run_dir / arm / "sft" / "checkpoint" / "model.safetensors").is_file()
        assert (run_dir / arm / "rl" / "checkpoint" / "model.safetensors").is_file()
        for point in ("before_sft", "after_sft", "rl_step_1", "after_rl"):
            data = json.loads((run_dir / arm / "eval" / point / "embedded_arithmetic.json").read_text())
            assert data["n"] == 2 and "pass@k" in data and "avg@n" in data
    assert (run_dir / "eksft" / "sft" / "masks.html").is_file()
    for f in ("table.md", "table.csv", "entropy.png", "kl.png", "reward.png", "pass_at_k.png", "index.html",
              "pass_at_k_curves_embedded_arithmetic.png"):
        assert (run_dir / "report" / f).is_file(), f
    report_shows_the_evaluations(run_dir)


def report_shows_the_evaluations(run_dir: Path):
    """Each estimate of table.md (percent, one decimal) and table.csv (fractions) is the evaluation JSON's metric,
    with an interval around it; the starting model's row reads the shared _base evaluation."""
    md = (run_dir / "report" / "table.md").read_text()
    csv_rows = {(r["arm"], r["point"], r["metric"]): r for r in csv.DictReader((run_dir / "report" / "table.csv").open())
                if r["benchmark"] == "embedded:arithmetic"}
    points = {"before training": "before_sft", "after SFT": "after_sft", "after RL": "after_rl"}
    for title in ("avg@2", "pass@2"):
        block = md.split(f"## {title}")[1].split("\n\n")[1]
        header, _, *rows = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in block.splitlines()]
        assert header == ["Arm", "Stage", "embedded:arithmetic", "Average", "Δ vs sft"]
        assert [(arm, points[stage]) for arm, stage, *_ in rows] == [("starting model", "before_sft")] + [
            (arm, point) for arm in ("sft", "eksft") for point in ("after_sft", "after_rl")]
        for arm, stage, cell, average, delta in rows:
            owner = "_base" if arm == "starting model" else arm
            data = json.loads((run_dir / owner / "eval" / points[stage] / "embedded_arithmetic.json").read_text())
            value = data["avg@n"] if title == "avg@2" else data["pass@k"]["2"]
            shown = re.fullmatch(r"(\d+\.\d)(?: \[(\d+\.\d), (\d+\.\d)\])?", cell)
            assert shown and average == cell, (arm, stage, cell, average)  # one benchmark: the average is the cell
            assert float(shown[1]) == pytest.approx(100 * value, abs=0.05)
            if shown[2] is not None:
                assert float(shown[2]) <= float(shown[1]) <= float(shown[3])
            assert delta == {"starting model": "", "sft": "baseline"}[arm] if arm != "eksft" else delta.count("p = ")
            metric = "avg@n" if title == "avg@2" else "pass@2"
            row = csv_rows[("_base" if arm == "starting model" else arm, points[stage], metric)]
            assert float(row["estimate"]) == pytest.approx(value, abs=1e-6)


def test_plan_keys_follow_dependencies():
    recipe = load_recipe(MINI)
    a = {s.name: s.key for s in plan(recipe, Path("/tmp/x"))}
    b = {s.name: s.key for s in plan(load_recipe(MINI, ["rl.learning_rate=0.5"]), Path("/tmp/x"))}
    changed = {name for name in a if a[name] != b[name]}
    assert changed == {"sft/rl", "sft/eval:rl_step_1", "sft/eval:after_rl",
                       "eksft/rl", "eksft/eval:rl_step_1", "eksft/eval:after_rl"}
    c = {s.name: s.key for s in plan(load_recipe(MINI, ["sft.learning_rate=0.5"]), Path("/tmp/x"))}
    assert {n for n in a if a[n] != c[n]} == {n for n in a if not n.startswith("_base")}


def test_report_settings_change_no_stage_key():
    """The report reads report.* from run.json: choosing another baseline or level redoes no stage."""
    keys = {s.name: s.key for s in plan(load_recipe(MINI), Path("/tmp/x"))}
    other = load_recipe(MINI, ["report.baseline_arm=eksft", "report.level=0.9", "report.n_boot=500"])
    assert {s.name: s.key for s in plan(other, Path("/tmp/x"))} == keys


def test_resolved_precision_is_part_of_every_stage_key():
    recipe = load_recipe(MINI)
    native = plan(recipe, Path("/tmp/x"), {k: NATIVE for k in ("sft", "rl", "eval")})
    emulated = plan(recipe, Path("/tmp/x"), {k: EMULATED for k in ("sft", "rl", "eval")})
    assert all(a.key != b.key for a, b in zip(native, emulated))  # a finished bf16 stage is not reused in float32
    by_name = {s.name: s for s in native}
    assert by_name["eksft/sft"].settings["precision"] == {"sft.bf16": "bfloat16"}
    assert by_name["eksft/rl"].settings["precision"] == {"rl.bf16": "bfloat16", "rollout.dtype": "bfloat16"}
    assert by_name["_base/eval:before_sft"].settings["precision"] == {"rollout.dtype": "bfloat16"}
    assert {s.name: s.settings["precision"] for s in emulated}["eksft/rl"] == {"rl.bf16": "float32",
                                                                               "rollout.dtype": "float32"}
    # Explicit settings resolve the same on every machine: the keys agree.
    pinned = load_recipe(MINI, ["sft.bf16=false", "rl.bf16=false", "rollout.dtype=float32"])
    assert [s.key for s in plan(pinned, Path("/tmp/x"), {k: NATIVE for k in ("sft", "rl", "eval")})] == \
        [s.key for s in plan(pinned, Path("/tmp/x"), {k: EMULATED for k in ("sft", "rl", "eval")})]


def test_a_run_refuses_arms_at_different_precisions():
    recipe = load_recipe(MINI, ["arms=[{name: sft, objective: {name: sft}, rl: {bf16: true}}, "
                                "{name: eksft, objective: {name: eksft}}]"])
    with pytest.raises(RecipeError, match=r"different precisions \(sft: bfloat16, eksft: float32\).*rl.bf16"):
        plan(recipe, Path("/tmp/x"), {k: EMULATED for k in ("sft", "rl", "eval")})
    plan(recipe, Path("/tmp/x"), {k: NATIVE for k in ("sft", "rl", "eval")})  # both bf16 there: one precision


def test_a_worker_that_resolves_differently_is_refused_before_it_writes(tmp_path, monkeypatch):
    recipe = load_recipe(MINI)
    stages = {s.name: s for s in plan(recipe, tmp_path, {k: NATIVE for k in ("sft", "rl", "eval")})}
    monkeypatch.setattr(precision_module, "detect_hardware", lambda device=None: EMULATED)
    with pytest.raises(RuntimeError, match=r"eksft/sft: this worker resolves sft.bf16=auto -> float32 \(cpu AVX2\), "
                                           r"but the run was planned with \{'sft.bf16': 'bfloat16'\}"):
        run_stage(stages["eksft/sft"], recipe.model_dump(mode="json"), str(tmp_path))
    assert not (tmp_path / "eksft").exists()


def test_launch_order_puts_the_longest_chains_first():
    stages = plan(load_recipe(MINI), Path("/tmp/x"))
    order = [s.name for s in launch_order(stages)]
    # sft -> rl -> eval chains first (both arms), then rl, then the evaluations, the base model's first.
    assert order[:4] == ["sft/sft", "eksft/sft", "sft/rl", "eksft/rl"]
    assert order[4] == "_base/eval:before_sft"
    assert set(order[5:]) == {s.name for s in stages if s.kind == "eval" and s.arm != "_base"}


def test_a_stage_is_admitted_with_its_trainer_workers_memory_and_cpus():
    """An RL stage with Ray trainer workers holds its own memory plus each worker's (the arm's rl.workers), so the
    driver never starts two stages that would each wait for their workers' share; rl.worker_cpus counts too, and
    so do the cold start's workers (sft.workers)."""
    from eksft.pipeline.driver import engine_needs, stage_needs
    from rl.common.cpu_share import TOKEN_CPU

    recipe = load_recipe(MINI, ["resources.rl.memory_gib=5", "resources.rl.worker_memory_gib=4.5",
                                "arms=[{name: sft, objective: {name: sft}}, "
                                "{name: eksft, objective: {name: eksft}, rl: {workers: 2, worker_cpus: 0.5}}]"])
    stages = {s.name: s for s in plan(recipe, Path("/tmp/x"))}
    assert stage_needs(recipe, stages["sft/rl"]) == (1, 0, 5 * 2**30)  # rl.workers 1: in the stage's process
    assert stage_needs(recipe, stages["eksft/rl"]) == (1 + 2 * 0.5, 0, (5 + 2 * 4.5) * 2**30)
    assert stage_needs(recipe, stages["eksft/sft"]) == (1, 0, 0)  # memory not set: not counted
    # On a cluster with GPUs each Ray worker takes one GPU besides the stage's own.
    assert stage_needs(recipe, stages["eksft/rl"], gpu_cluster=True) == (2, 2, (5 + 2 * 4.5) * 2**30)
    # The cold start's workers: the same accounting under resources.sft and sft.workers.
    recipe = load_recipe(MINI, ["sft.workers=2", "resources.sft.memory_gib=1", "resources.sft.worker_memory_gib=3",
                                "resources.sft.num_gpus=0"])
    stages = {s.name: s for s in plan(recipe, Path("/tmp/x"))}
    assert stage_needs(recipe, stages["eksft/sft"]) == (1, 0, (1 + 2 * 3) * 2**30)
    assert stage_needs(recipe, stages["eksft/sft"], gpu_cluster=True) == (1, 2, (1 + 2 * 3) * 2**30)
    with pytest.raises(RecipeError, match=r"resources.rl.memory_gib"):
        load_recipe(MINI, ["resources.rl.memory_gib=-1"])
    # Engines in Ray actors generate beside RL and evaluation stages: their CPUs (and GPUs) are the stage's too.
    recipe = load_recipe(MINI, ["rollout.num_engines=2", "rollout.num_cpus=0.5"])
    stages = {s.name: s for s in plan(recipe, Path("/tmp/x"))}
    assert stage_needs(recipe, stages["eksft/rl"]) == (1 + 2 * 0.5, 0, 0)
    assert stage_needs(recipe, stages["eksft/eval:after_rl"]) == (1 + 2 * 0.5, 0, 0)
    assert stage_needs(recipe, stages["eksft/sft"]) == (1, 0, 0)
    assert engine_needs(recipe, stages["eksft/rl"]) == (2 * 0.5, 0)
    # By default the engines share the stage's CPUs: a token reservation each, taken out of the stage's own.
    recipe = load_recipe(MINI, ["rollout.num_engines=2"])
    stages = {s.name: s for s in plan(recipe, Path("/tmp/x"))}
    assert stage_needs(recipe, stages["eksft/rl"]) == (1, 0, 0)
    assert engine_needs(recipe, stages["eksft/rl"]) == (2 * TOKEN_CPU, 0)
    assert engine_needs(recipe, stages["eksft/sft"]) == (0, 0)
    # and each engine actor's memory, when the recipe states it
    recipe = load_recipe(MINI, ["rollout.num_engines=2", "resources.rl.memory_gib=5", "resources.rl.engine_memory_gib=2.5",
                                "resources.eval.engine_memory_gib=2"])
    stages = {s.name: s for s in plan(recipe, Path("/tmp/x"))}
    assert stage_needs(recipe, stages["eksft/rl"]) == (1, 0, (5 + 2 * 2.5) * 2**30)
    assert stage_needs(recipe, stages["eksft/eval:after_rl"]) == (1, 0, 2 * 2 * 2**30)
    assert stage_needs(recipe, stages["eksft/sft"]) == (1, 0, 0)
    recipe = load_recipe(MINI, ["resources.rl.memory_gib=5", "resources.rl.engine_memory_gib=2.5"])  # engine in process
    assert stage_needs(recipe, {s.name: s for s in plan(recipe, Path("/tmp/x"))}["eksft/rl"]) == (1, 0, 5 * 2**30)
    # On GPUs, each engine's tensor-parallel GPUs.
    recipe = load_recipe(MINI, ["rollout.num_engines=2", "rollout.num_gpus=1", "rollout.tensor_parallel_size=2"])
    stages = {s.name: s for s in plan(recipe, Path("/tmp/x"))}
    assert engine_needs(recipe, stages["eksft/rl"]) == (2 * TOKEN_CPU, 4)


def test_rollout_cpus_left_unset_keep_the_stage_keys_of_the_old_default():
    """``rollout.num_cpus`` unset replaced the default 1: stages finished under it keep their keys (pinned: the keys
    the code before the change computed, at e0a369a)."""
    hardware = {k: NATIVE for k in ("sft", "rl", "eval")}
    before = {"sft/rl": "88e11867572bf889", "sft/eval:after_rl": "41dd60d42841087d",
              "eksft/eval:after_sft": "806c90c57be476b4", "_base/eval:before_sft": "6dc37c1c2b71b381"}
    keys = {s.name: s.key for s in plan(load_recipe(MINI), Path("/tmp/x"), hardware)}
    assert {name: keys[name] for name in before} == before
    assert {s.name: s.key for s in plan(load_recipe(MINI, ["rollout.num_cpus=1"]), Path("/tmp/x"), hardware)} == keys
    changed = {s.name: s.key for s in plan(load_recipe(MINI, ["rollout.num_cpus=2"]), Path("/tmp/x"), hardware)}
    assert changed["sft/rl"] != keys["sft/rl"] and changed["sft/sft"] == keys["sft/sft"]


def test_packing_at_its_default_keeps_the_stage_keys():
    """``rl.packing`` / ``rl.micro_batch_tokens`` / ``rl.skip_zero_gradient`` / ``sft.packing`` /
    ``rollout.enforce_eager`` came later: at their defaults every key stays (the pinned ones above hold); set
    otherwise, the stages they change get new keys."""
    hardware = {k: NATIVE for k in ("sft", "rl", "eval")}
    keys = {s.name: s.key for s in plan(load_recipe(MINI), Path("/tmp/x"), hardware)}
    explicit = ["rl.packing=auto", "sft.packing=auto", "rl.skip_zero_gradient=true"]
    assert {s.name: s.key for s in plan(load_recipe(MINI, explicit), Path("/tmp/x"), hardware)} == keys
    off = {s.name: s.key for s in plan(load_recipe(MINI, ["rl.packing=off"]), Path("/tmp/x"), hardware)}
    assert off["sft/rl"] != keys["sft/rl"] and off["sft/sft"] == keys["sft/sft"]
    budget = {s.name: s.key for s in plan(load_recipe(MINI, ["rl.micro_batch_tokens=1024"]), Path("/tmp/x"), hardware)}
    assert budget["sft/rl"] != keys["sft/rl"]
    sft_off = {s.name: s.key for s in plan(load_recipe(MINI, ["sft.packing=off"]), Path("/tmp/x"), hardware)}
    assert sft_off["sft/sft"] != keys["sft/sft"]
    every_backward = {s.name: s.key for s in plan(load_recipe(MINI, ["rl.skip_zero_gradient=false"]), Path("/tmp/x"),
                                                  hardware)}
    assert every_backward["sft/rl"] != keys["sft/rl"] and every_backward["sft/sft"] == keys["sft/sft"]
    compiled = {s.name: s.key for s in plan(load_recipe(MINI, ["rollout.enforce_eager=false"]), Path("/tmp/x"),
                                            hardware)}
    assert compiled["sft/rl"] != keys["sft/rl"] and compiled["sft/sft"] == keys["sft/sft"]


def test_engine_actors_that_cannot_all_be_placed_are_refused_before_any_stage(tmp_path):
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        with pytest.raises(ValueError, match=r"_base/eval:before_sft needs 3 CPUs \(its own 1 \+ 2 engines x rollout.num_cpus 1\) "
                                             r"but the Ray cluster has 2: leave rollout.num_cpus unset"):
            run_pipeline(load_recipe(MINI, ["rollout.num_engines=2", "rollout.num_cpus=1"]), tmp_path)
    finally:
        ray.shutdown()
    assert not any((tmp_path / arm / "sft" / "DONE").exists() for arm in ("sft", "eksft"))


@pytest.mark.slow
def test_mini_recipe_through_the_ray_pipeline(tmp_path, capsys):
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:  # the SFT stages run on 2 FSDP2 trainer workers each (Ray actors inside the stages' CPUs)
        run_pipeline(load_recipe(MINI, ["sft.workers=2"]), tmp_path)
    finally:
        ray.shutdown()
    expected_outputs(tmp_path)
    for arm in ("sft", "eksft"):
        assert (tmp_path / arm / "sft" / "checkpoints" / "checkpoint-2" / "dcp").is_dir()  # the workers' sharded state
        assert [json.loads(ln)["step"] for ln in (tmp_path / arm / "sft" / "metrics.jsonl").open()] == [1, 2]
    out = capsys.readouterr().out
    assert "| sft" in out and "| eksft" in out  # the table is printed at the end
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["sft_steps"] == {"sft": 2, "eksft": 2}
    # The global batch, in run.json and as each SFT stage's 2 workers realised it.
    sft = load_recipe(MINI).sft
    batch = {"batch_size": sft.batch_size, "grad_accum": sft.grad_accum, "global_batch": 2 * sft.batch_size * sft.grad_accum}
    assert run["sft_global_batch"] == {"workers": 2, **batch}
    for arm in ("sft", "eksft"):
        assert json.loads((tmp_path / arm / "sft" / "batch.json").read_text()) == {"workers": 2, **batch}
    # The precision the Ray workers resolved (a probe task per stage kind), in run.json and in each stage's DONE.
    want = resolve_bf16("auto", hardware=detect_hardware()).dtype
    assert run["precision"]["sft"]["sft.bf16"]["dtype"] == run["precision"]["rl"]["rl.bf16"]["dtype"] == want
    assert run["precision"]["eval"]["rollout.dtype"]["setting"] == "auto"
    assert run["precision"]["sft"]["sft.bf16"]["capability"] == detect_hardware().capability
    assert done_marker(tmp_path, "eksft/rl")["precision"]["rl.bf16"]["dtype"] == want
    assert done_marker(tmp_path, "sft/eval:after_rl")["precision"]["rollout.dtype"]["dtype"] == want
    # What produced the run: the code, the libraries, the hub commits (none: tiny model, embedded data), the workers.
    provenance = run["provenance"]
    assert set(provenance) == {"git", "versions", "python", "platform", "hub", "hardware"}
    assert set(provenance["git"]) == {"commit", "dirty"}
    assert provenance["git"]["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", provenance["git"]["commit"])
    assert all(provenance["versions"][p] for p in ("torch", "transformers", "vllm", "ray", "peft", "datasets",
                                                   "math-verify", "eksft"))
    assert provenance["hub"] == {}
    for kind in ("sft", "rl", "eval"):  # from each kind's Ray probe task
        hardware = provenance["hardware"][kind]
        assert hardware["cpu_capability"] == detect_hardware().capability and isinstance(hardware["gpus"], list)
        assert (hardware["gpus"] == []) == (hardware["device"] == "cpu")  # a GPU worker names its GPUs


@pytest.mark.slow
def test_killed_after_sft_resumes_without_redoing_it(tmp_path):
    """A real SIGKILL of `eksft run` right after the first SFT stage finished; the rerun skips it."""
    cmd = [sys.executable, "-m", "eksft.cli", "run", str(MINI), "--local", "--run-dir", str(tmp_path),
           "--set", LOCAL_HF[0]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = tmp_path / "sft" / "sft" / "DONE"
    deadline = time.time() + 300
    while not marker.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.is_file() and not (tmp_path / "report").exists()
    first = marker.read_text()

    assert main(["run", str(MINI), "--local", "--run-dir", str(tmp_path), "--set", LOCAL_HF[0]]) == 0
    assert marker.read_text() == first  # SFT was not repeated
    expected_outputs(tmp_path)

    # A changed RL setting reruns RL and the evaluations after it, nothing else.
    before = {s: done_marker(tmp_path, s)["finished"] for s in
              ("sft/sft", "sft/eval:after_sft", "sft/rl", "sft/eval:after_rl", "eksft/rl")}
    base_eval = (tmp_path / "_base" / "eval" / "before_sft" / "DONE").read_text()
    run_pipeline(load_recipe(MINI, [*LOCAL_HF, "rl.learning_rate=2.0e-3"]), tmp_path, local=True)
    after = {s: done_marker(tmp_path, s)["finished"] for s in before}
    assert after["sft/sft"] == before["sft/sft"] and after["sft/eval:after_sft"] == before["sft/eval:after_sft"]
    assert after["sft/rl"] > before["sft/rl"] and after["sft/eval:after_rl"] > before["sft/eval:after_rl"]
    assert after["eksft/rl"] > before["eksft/rl"]
    assert (tmp_path / "_base" / "eval" / "before_sft" / "DONE").read_text() == base_eval


def test_recipe_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINI.read_text().replace("arms:", "armz:"))
    assert main(["run", str(bad), "--local"]) == 2
    assert "armz: unknown key" in capsys.readouterr().err
    with pytest.raises(RecipeError, match=r"arms\.0\.rl \(eksft\): lr: Extra inputs are not permitted.*allowed keys: .*learning_rate"):
        load_recipe(None, ["arms=[{name: eksft, objective: {name: eksft}, rl: {lr: 0.1}}]"])
    with pytest.raises(RecipeError, match=r"sft: num_processes was replaced by workers: write `workers: 4`"):
        load_recipe(MINI, ["sft.num_processes=4"])  # torchrun's processes are gone: what to write instead
    with pytest.raises(RecipeError, match=r"must be a multiple of rl.save_every"):
        load_recipe(MINI, ["eval.every_rl_steps=3", "rl.save_every=2"])
