"""Seeds in recipes: every arm once per seed, each seed in its own directory, resumed on its own, pooled by the report.

The statistics the report shows for a two-seed run are recomputed here with ``eksft.eval.stats`` on the
``[seeds, problems]`` arrays read straight from the evaluation JSON files.
"""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from eksft.cli import _recipe_at_seed, main
from eksft.config import RecipeError, load_recipe
from eksft.eval.runner import problem_values
from eksft.eval.stats import bootstrap_ci, stratified_bootstrap_ci, stratified_paired_difference
from eksft.layout import RunLayout, parse_seed_dir, seed_dir_name
from eksft.pipeline import plan, run_pipeline
from eksft.report import build_report
from eksft.report.data import load_run
from eksft.report.plots import pass_at_k_curves, timeline_series
from eksft.report.table import Comparison, table_rows

FIXTURES = Path(__file__).parent / "fixtures"
MINI = FIXTURES / "quickstart_mini.yaml"
COMPARE = Path(__file__).parent.parent / "recipes" / "compare_cpu.yaml"


# --- the recipe: which seeds a seed changes ---------------------------------------------------------------


def test_a_seed_shifts_the_sft_rl_and_eval_seeds_together():
    recipe = load_recipe(MINI, ["seeds=[3, 5]", "rl.seed=7", "eval.seed=2"])
    at5 = recipe.for_seed(5)
    assert (at5.seed, at5.rl.seed, at5.eval.seed) == (5, 12, 7)  # the recipe's seed is 0: shifted by 5
    # the data and the evaluation problems stay: only the seeds differ
    same = at5.model_dump()
    for key in ("seed",):
        same.pop(key)
    same["rl"].pop("seed"), same["eval"].pop("seed")
    ref = recipe.model_dump()
    ref.pop("seed"), ref["rl"].pop("seed"), ref["eval"].pop("seed")
    assert same == ref
    assert recipe.for_seed(None) is recipe
    with pytest.raises(RecipeError, match=r"seed 4 is not one of the recipe's seeds \[3, 5\]"):
        recipe.for_seed(4)


def test_listing_only_the_recipes_seed_runs_what_the_recipe_without_seeds_runs():
    without = plan(load_recipe(MINI), "/unused")
    listed = plan(load_recipe(MINI, ["seeds=[0]"]), "/unused")
    assert [s.key for s in without] == [s.key for s in listed]  # the same settings: the same stage keys
    assert [s.name for s in without][:2] == ["_base/eval:before_sft", "sft/sft"]
    assert [s.name for s in listed][:2] == ["_base/seed-0/eval:before_sft", "sft/seed-0/sft"]


def test_each_seed_has_its_own_stages_directories_and_keys(tmp_path):
    recipe = load_recipe(MINI, ["seeds=[0, 1]"])
    stages = plan(recipe, tmp_path)
    by_seed = {seed: [s for s in stages if s.seed == seed] for seed in (0, 1)}
    assert len(by_seed[0]) == len(by_seed[1]) == len(stages) // 2
    names = {s.name: s for s in stages}
    for s in stages:
        arm_root = tmp_path / s.arm / f"seed-{s.seed}"
        assert s.out.root.parent in (arm_root, arm_root / "eval"), s.out.root
        assert s.name.startswith(f"{s.arm}/seed-{s.seed}/")
        assert all(names[d].seed == s.seed for d in s.deps)  # no stage waits on another seed's
    for a, b in zip(by_seed[0], by_seed[1]):
        assert a.name.replace("seed-0", "seed-1") == b.name and a.key != b.key
        if a.kind == "sft":  # the data content is the same at every seed; the seed is not
            assert a.settings["data"] == b.settings["data"] and (a.settings["seed"], b.settings["seed"]) == (0, 1)
        if a.kind == "rl":
            assert a.settings["data_rl"] == b.settings["data_rl"]
            assert (a.settings["rl"]["seed"], b.settings["rl"]["seed"]) == (0, 1)
        if a.kind == "eval":  # the same problems, another sampling seed
            ea, eb = dict(a.settings["eval"]), dict(b.settings["eval"])
            assert (ea.pop("seed", 0), eb.pop("seed")) == (0, 1) and ea == eb


@pytest.mark.parametrize("override, message", [
    ("seeds=[0, 0]", r"seeds must be distinct, got \[0, 0\]"),
    ("seeds=[]", r"seeds: List should have at least 1 item"),
])
def test_bad_seeds_name_the_key(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(MINI, [override])


def test_a_seed_that_would_make_rl_seed_negative_is_refused():
    with pytest.raises(RecipeError, match=r"seeds: seed 0 would run with rl.seed 1 \+ \(0 - seed 4\) = -3 < 0"):
        load_recipe(MINI, ["seed=4", "rl.seed=1", "seeds=[0, 4]"])


def test_the_cli_picks_a_seed_of_the_recipe():
    seeded = load_recipe(MINI, ["seeds=[2, 3]"])
    recipe, seed = _recipe_at_seed(seeded, None)
    assert seed == 2 and recipe.seed == 2  # the first by default
    recipe, seed = _recipe_at_seed(seeded, 3)
    assert seed == 3 and recipe.rl.seed == 3
    assert _recipe_at_seed(load_recipe(MINI), None)[1] is None  # no seeds: no seed level
    with pytest.raises(RecipeError, match=r"--seed 1: the recipe has no `seeds`"):
        _recipe_at_seed(load_recipe(MINI), 1)


def test_the_seed_directory_names():
    assert seed_dir_name(12) == "seed-12" and parse_seed_dir("seed-12") == 12
    assert parse_seed_dir("seed-x") is None and parse_seed_dir("sft") is None
    with pytest.raises(ValueError):
        seed_dir_name(True)


def test_the_comparison_evaluates_problems_disjoint_from_its_training_rows():
    """What recipes/compare_cpu.yaml says in its header: no evaluation problem is a training problem."""
    from eksft.data import load_prompt_answer_rows
    from eksft.eval.benchmarks import EMBEDDED_EVAL_SEED
    from eksft.data.sources import read_rows

    recipe = load_recipe(COMPARE)
    assert recipe.seeds == [0, 1, 2] and [a.name for a in recipe.arms] == ["sft", "eksft"]
    sft, rl = ({r["problem"] for r in load_prompt_answer_rows(recipe.data, source)}
               for source in (recipe.data.sft, recipe.data.rl))
    assert len(sft) == recipe.data.sft.num_examples and len(rl) == recipe.data.rl.num_examples and not sft & rl
    training = sft | rl
    (benchmark,) = recipe.eval.benchmarks
    problems = [row.data["problem"] for row in read_rows(benchmark, num_examples=recipe.eval.num_problems,
                                                         seed=EMBEDDED_EVAL_SEED)]
    assert len(set(problems)) == recipe.eval.num_problems >= 96 and recipe.eval.n >= 4
    assert not training & set(problems)


# --- the report pools the seeds ---------------------------------------------------------------------------


def _fixture_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_run_small", FIXTURES / "make_run_small.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_eval(path: Path, arm: str, point: str, counts: list[int]) -> None:
    """An evaluation record of 8 problems, n = 4 samples, the first c samples of problem i correct."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_fixture_module().eval_record(arm, point, "embedded:arithmetic", counts)))


# correct counts (of n = 4) of 8 problems: seed -> arm -> point
COUNTS = {
    0: {"_base": {"before_sft": [0, 1, 0, 2, 1, 0, 3, 1]},
        "sft": {"after_sft": [2, 1, 1, 3, 2, 1, 2, 1], "after_rl": [3, 2, 1, 3, 2, 1, 3, 2]},
        "eksft": {"after_sft": [2, 1, 1, 3, 2, 1, 3, 2], "after_rl": [4, 2, 1, 3, 3, 1, 3, 2]}},
    1: {"_base": {"before_sft": [1, 1, 0, 1, 1, 0, 2, 1]},
        "sft": {"after_sft": [1, 1, 0, 3, 2, 2, 2, 1], "after_rl": [2, 2, 1, 4, 2, 1, 3, 1]},
        "eksft": {"after_sft": [3, 1, 2, 3, 2, 1, 3, 1], "after_rl": [3, 3, 2, 4, 2, 2, 3, 3]}},
}


def _two_seed_run(run_dir: Path) -> Path:
    layout = RunLayout(run_dir)
    layout.run_dir.mkdir(parents=True)
    layout.run_json.write_text(json.dumps({
        "recipe": "two_seeds", "arms": ["sft", "eksft"], "seeds": [0, 1], "benchmarks": ["embedded:arithmetic"],
        "eval_n": 4, "sft_steps": {"sft": 2, "eksft": 2}, "rl_steps": {"sft": 2, "eksft": 2},
        "config": {"arms": [{"name": "sft", "objective": {"name": "sft"}}, {"name": "eksft", "objective": {"name": "eksft"}}],
                   "report": {"baseline_arm": "sft", "level": 0.95, "n_boot": 500}}}))
    for seed, arms in COUNTS.items():
        for arm, points in arms.items():
            for point, counts in points.items():
                _write_eval(layout.arm(arm, seed).eval(point).result("embedded:arithmetic"), arm, point, counts)
        for arm in ("sft", "eksft"):  # the pipeline copies the starting model's evaluation into every arm
            shutil.copytree(layout.base(seed).eval("before_sft").root, layout.arm(arm, seed).eval("before_sft").root)
            rows = [{"phase": "rl", "step": s, "reward_mean": 0.1 * s + seed} for s in (1, 2)]
            layout.arm(arm, seed).rl.metrics.parent.mkdir(parents=True, exist_ok=True)
            layout.arm(arm, seed).rl.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def _seed_values(run_dir: Path, arm: str, point: str, metric: str) -> np.ndarray:
    """[S, P] straight from the evaluation files of every seed."""
    layout = RunLayout(run_dir)
    return np.array([problem_values(json.loads(layout.arm(arm, seed).eval(point).result("embedded:arithmetic")
                                               .read_text()), metric) for seed in (0, 1)])


def test_the_report_pools_the_seeds_with_the_two_level_statistics(tmp_path):
    run_dir = _two_seed_run(tmp_path / "run")
    run = load_run(run_dir)
    assert run.seeds == [0, 1] and run.num_seeds == 2 and run.arms == ["sft", "eksft"]
    comparison = Comparison(run)
    rows = {(r.arm, r.stage): r for r in comparison.rows}
    for (arm, stage), row in rows.items():
        point = "before_sft" if arm == "_base" else stage
        for metric in ("avg@n", "pass@4", "pass@2"):
            values = _seed_values(run_dir, arm, point, metric)
            assert values.shape == (2, 8)
            want = stratified_bootstrap_ci([values], n_boot=500)
            got = comparison.estimate(row, metric)
            assert (got.value, got.low, got.high) == pytest.approx(want, abs=1e-12)
            assert got.value == pytest.approx(values.mean(), abs=1e-12)  # the grand mean over seeds and problems
            if arm == "eksft":
                diff, low, high, p = stratified_paired_difference(
                    [values], [_seed_values(run_dir, "sft", point, metric)], n_boot=500)
                d = comparison.delta(row, metric)
                assert (d.diff, d.low, d.high, d.p_value) == pytest.approx((diff, low, high, p), abs=1e-12)
    # the two-level interval is not the one-seed interval of either seed
    one = bootstrap_ci(_seed_values(run_dir, "eksft", "after_rl", "avg@n")[0], n_boot=500)
    assert comparison.estimate(rows[("eksft", "after_rl")], "avg@n").value != pytest.approx(one[0])


def test_the_report_files_of_a_two_seed_run(tmp_path):
    run_dir = _two_seed_run(tmp_path / "run")
    out = build_report(run_dir)
    md = (out / "table.md").read_text()
    assert "8 problems per benchmark, 2 seeds (0, 1)" in md and "two-level percentile bootstrap" in md
    assert "paired over the same problems and seeds" in md
    csv_rows = list(csv.DictReader((out / "table.csv").open()))
    assert {r["seeds"] for r in csv_rows} == {"2"}
    avg = next(r for r in csv_rows if (r["arm"], r["stage"], r["benchmark"], r["metric"])
               == ("eksft", "after_rl", "average", "avg@n"))
    assert float(avg["estimate"]) == pytest.approx(_seed_values(run_dir, "eksft", "after_rl", "avg@n").mean(), abs=1e-6)
    html = (out / "index.html").read_text()
    assert "seeds: 0, 1" in html and "eksft, seed 1" in html
    # the pass@k curves pool the seeds too
    run = load_run(run_dir)
    (after_sft, after_rl) = [c for c in pass_at_k_curves(run, "embedded:arithmetic")["eksft"] if c.label != "starting model"]
    for k in (1, 3):
        want = bootstrap_ci(_seed_values(run_dir, "eksft", "after_rl", f"pass@{k}"), n_boot=500)
        assert (after_rl.estimate[k - 1], after_rl.low[k - 1], after_rl.high[k - 1]) == pytest.approx(want, abs=1e-12)
    # timelines: the mean over the seeds at each step (seed s logged 0.1 * step + s)
    assert timeline_series(run, None, "reward_mean")["sft"].y == pytest.approx([0.6, 0.7])


def test_a_seed_without_its_evaluation_leaves_the_cell_empty(tmp_path):
    """A cell pools every seed or shows nothing: one seed's number is not the run's."""
    run_dir = _two_seed_run(tmp_path / "run")
    shutil.rmtree(RunLayout(run_dir).arm("eksft", 1).eval("after_rl").root)
    run = load_run(run_dir)
    comparison = Comparison(run)
    row = next(r for r in table_rows(run) if (r.arm, r.stage) == ("eksft", "after_rl"))
    assert comparison.estimate(row, "avg@n").value is None and comparison.delta(row, "avg@n") is None
    other = next(r for r in table_rows(run) if (r.arm, r.stage) == ("eksft", "after_sft"))
    assert comparison.estimate(other, "avg@n").value is not None


def test_the_seeds_are_found_on_disk_without_run_json(tmp_path):
    run_dir = _two_seed_run(tmp_path / "run")
    (run_dir / "run.json").unlink()
    layout = RunLayout(run_dir)
    assert layout.seeds_on_disk() == [0, 1] and layout.arms_on_disk() == ["eksft", "sft"]
    assert load_run(run_dir).seeds == [0, 1]


# --- a real two-seed run: the layout, one seed resumed without touching the other, the pooled report ------


@pytest.mark.slow
def test_two_seeds_run_resume_one_seed_alone_and_pool_in_the_report(tmp_path):
    overrides = ["seeds=[0, 1]", "rollout.engine=hf", "arms=[{name: sft, objective: {name: sft}}, {name: base}]",
                 "eval.every_rl_steps=0"]
    assert main(["run", str(MINI), "--local", "--run-dir", str(tmp_path), *[a for o in overrides for a in ("--set", o)]]) == 0
    layout = RunLayout(tmp_path)
    for seed in (0, 1):
        assert (layout.arm("sft", seed).sft.checkpoint / "model.safetensors").is_file()
        for arm in ("sft", "base"):
            assert (layout.arm(arm, seed).rl.checkpoint / "model.safetensors").is_file()
            assert layout.arm(arm, seed).eval("after_rl").result("embedded:arithmetic").is_file()
        assert layout.base(seed).eval("before_sft").done_marker.is_file()
    assert not (tmp_path / "sft" / "sft").exists()  # no stage outside the seed directories
    assert json.loads(layout.run_json.read_text())["seeds"] == [0, 1]
    # the seeds sampled differently: seed 1's RL rollouts are not seed 0's
    rollouts = [(layout.arm("base", s).rl.root / "rollouts" / "step-1.jsonl").read_text() for s in (0, 1)]
    assert rollouts[0] != rollouts[1]

    # seed 1's RL of arm sft was killed after its first step: its final checkpoint, its last step and what
    # follows it are gone; seed 0 is finished
    rl1 = layout.arm("sft", 1).rl
    seed0 = {p: p.read_bytes() for p in tmp_path.glob("*/seed-0/**/DONE")}
    assert len(seed0) == 1 + 4 + 2  # _base's evaluation; sft's sft, after_sft, rl, after_rl; base's rl, after_rl
    redone = {rl1.done_marker, layout.arm("sft", 1).eval("after_rl").done_marker}
    seed1_kept = {p: p.read_bytes() for p in tmp_path.glob("*/seed-1/**/DONE") if p not in redone}
    assert len(seed1_kept) == len(seed0) - 2
    first_line = rl1.metrics.read_text().splitlines()[0]
    rl1.done_marker.unlink()
    shutil.rmtree(rl1.checkpoint)
    shutil.rmtree(rl1.step_checkpoint(2))
    rl1.metrics.write_text(first_line + "\n")
    layout.arm("sft", 1).eval("after_rl").done_marker.unlink()

    assert main(["run", str(MINI), "--local", "--run-dir", str(tmp_path), *[a for o in overrides for a in ("--set", o)]]) == 0
    assert {p: p.read_bytes() for p in tmp_path.glob("*/seed-0/**/DONE")} == seed0  # seed 0 untouched
    assert all(p.read_bytes() == b for p, b in seed1_kept.items())  # and seed 1's finished stages too
    lines = rl1.metrics.read_text().splitlines()
    assert lines[0] == first_line and [json.loads(ln)["step"] for ln in lines] == [1, 2]  # resumed at step 2
    assert rl1.done_marker.is_file() and layout.arm("sft", 1).eval("after_rl").done_marker.is_file()

    # the report pools both seeds: every cell is the two-level statistic of the [2, P] values on disk
    run = load_run(tmp_path)
    comparison = Comparison(run)
    for row in comparison.rows:
        point = "before_sft" if row.arm == "_base" else row.point
        values = np.array([problem_values(json.loads(layout.arm(row.arm, s).eval(point)
                                                     .result("embedded:arithmetic").read_text()), "avg@n")
                           for s in (0, 1)])
        got = comparison.estimate(row, "avg@n")
        assert (got.value, got.low, got.high) == pytest.approx(stratified_bootstrap_ci([values]), nan_ok=True)
    assert "2 seeds (0, 1)" in (tmp_path / "report" / "table.md").read_text()
