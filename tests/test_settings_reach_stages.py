"""Every setting an arm or `--set` changes reaches what the stage trains with, the same from `eksft sft | rl | eval`
and from the pipeline: spies on the trainers' constructors (and on evaluate) record the real objects they receive."""

import shutil
from pathlib import Path

import pytest

from eksft.cli import main
from eksft.config import load_recipe
from eksft.layout import RunLayout
from eksft.pipeline import plan, run_stage

MINI = Path(__file__).parent / "fixtures" / "quickstart_mini.yaml"
ARMS = "arms=[{name: base, objective: null}, {name: eksft, objective: {name: eksft}}]"


class Stop(Exception):
    """Raised by a spy once it has seen what the stage passes on: nothing is trained."""


@pytest.fixture
def spies(monkeypatch):
    import eksft.eval.runner as runner
    import eksft.sft.step as sft_step
    import rl.common.resume as resume
    import rl.workers as workers
    from rl.grpo.trainer import GRPOTrainer

    seen: list[dict] = []
    sft_seen: dict = {}  # what the cold start built before it started its workers

    def record(**what):
        seen.append(what)
        raise Stop

    loss_cls, latest = sft_step.ObjectiveStepLoss, resume.latest_complete_checkpoint
    monkeypatch.setattr(sft_step, "ObjectiveStepLoss", lambda objective, *a, **kw: (
        sft_seen.update(objective=objective), loss_cls(objective, *a, **kw))[1])
    monkeypatch.setattr(resume, "latest_complete_checkpoint", lambda directory, *a, **kw: (
        sft_seen.update(checkpoints=str(directory)), latest(directory, *a, **kw))[1])
    monkeypatch.setattr(workers, "make_worker_group", lambda settings, n, **kw: record(
        **sft_seen, learning_rate=settings.learning_rate, workers=n))
    monkeypatch.setattr(GRPOTrainer, "__init__", lambda self, **kw: record(
        config=kw["config"], start=kw["model_dir"], reference=kw["reference_dir"], outputs=kw["outputs"]))
    monkeypatch.setattr(runner, "evaluate", lambda model_dir, benchmarks, cfg, **kw: record(
        model=model_dir, cfg=cfg, rollout=kw["rollout_cfg"], out=Path(kw["out_dir"]),
        trust_remote_code=kw["trust_remote_code"]))
    return seen


def both_ways(spies, tmp_path, overrides: list[str], command: list[str], stage: str) -> tuple[dict, dict, object]:
    """What the spies saw when `eksft COMMAND` ran, then when the pipeline ran the same stage; and the recipe."""
    overrides = [ARMS, f"output_dir={tmp_path}", "name=run", *overrides]
    recipe = load_recipe(MINI, overrides)
    with pytest.raises(Stop):
        main([*command, "--recipe", str(MINI), *(a for o in overrides for a in ("--set", o))])
    stages = {s.name: s for s in plan(recipe, tmp_path / "run")}
    with pytest.raises(Stop):
        run_stage(stages[stage], recipe.model_dump(mode="json"), str(tmp_path / "run"))
    return spies[-2], spies[-1], recipe


def test_the_arms_objective_and_the_sft_settings_reach_the_sft_trainer(spies, tmp_path):
    cli, pipeline, recipe = both_ways(spies, tmp_path, ["arms.eksft.objective.ratio=0.3", "arms.eksft.objective.lambda_kl=0.2",
                                                 "sft.learning_rate=3.0e-4"], ["sft", "--arm", "eksft"], "eksft/sft")
    for seen in (cli, pipeline):
        assert seen["objective"] == recipe.arm("eksft").objective
        assert (seen["objective"].ratio, seen["objective"].lambda_kl, seen["learning_rate"]) == (0.3, 0.2, 3.0e-4)
    assert cli["checkpoints"] == pipeline["checkpoints"] == str(RunLayout(tmp_path / "run").arm("eksft").sft.checkpoints)
    key = {s.name: s for s in plan(recipe, tmp_path / "run")}["eksft/sft"].settings
    assert key["sft"]["objective"]["ratio"] == 0.3 and key["sft"]["learning_rate"] == 3.0e-4  # a change reruns it


def test_the_arms_rl_overrides_reach_the_grpo_trainer_and_kl_is_to_the_base_model(spies, tmp_path, tiny_qwen2_dir):
    overrides = ["rl.learning_rate=1.0e-4", "arms.eksft.rl.learning_rate=2.0e-6", "arms.eksft.rl.lora.enabled=true",
                 "rl.lora.r=4"]
    eksft = RunLayout(tmp_path / "run").arm("eksft")
    shutil.copytree(tiny_qwen2_dir, eksft.sft.checkpoint)  # stands for the arm's finished SFT stage
    cli, pipeline, recipe = both_ways(spies, tmp_path, overrides, ["rl", "--arm", "eksft"], "eksft/rl")
    for seen in (cli, pipeline):
        assert seen["config"] == recipe.arm_rl(recipe.arm("eksft"))
        assert (seen["config"].learning_rate, seen["config"].lora.enabled, seen["config"].lora.r) == (2.0e-6, True, 4)
        assert seen["start"] == str(eksft.sft.checkpoint.resolve()) and seen["reference"] == tiny_qwen2_dir
        assert seen["outputs"] == eksft.rl.trainer_outputs()
    cli, pipeline, recipe = both_ways(spies, tmp_path, overrides, ["rl", "--arm", "base"], "base/rl")
    for seen in (cli, pipeline):  # the recipe's rl section, for an arm without overrides
        assert seen["config"] == recipe.rl and seen["config"].learning_rate == 1.0e-4
        assert seen["start"] == seen["reference"] == tiny_qwen2_dir


def test_the_eval_settings_reach_evaluate(spies, tmp_path, tiny_qwen2_dir):
    cli, pipeline, recipe = both_ways(spies, tmp_path, ["eval.n=3", "eval.temperature=0.5", "rollout.engine=hf"],
                                      ["eval", "--out", str(tmp_path / "run/_base/eval/before_sft")],
                                      "_base/eval:before_sft")
    for seen in (cli, pipeline):
        assert seen["cfg"] == recipe.eval and (seen["cfg"].n, seen["cfg"].temperature) == (3, 0.5)
        assert seen["rollout"] == recipe.rollout and seen["model"] == tiny_qwen2_dir
        assert seen["trust_remote_code"] is False
    assert cli["out"] == pipeline["out"] == RunLayout(tmp_path / "run").base().eval("before_sft").root


def test_eksft_sft_needs_an_unambiguous_arm(spies, tmp_path, capsys):
    assert main(["sft", "--recipe", str(MINI), "--output", str(tmp_path)]) == 2
    assert "the recipe has 2 arms with an objective (sft, eksft): choose one with --arm" in capsys.readouterr().err
    with pytest.raises(Stop):  # --objective names an arm of the recipe: that arm's objective
        main(["sft", "--recipe", str(MINI), "--objective", "eksft", "--set", "arms.eksft.objective.ratio=0.4"])
    assert spies[-1]["objective"].ratio == 0.4
    with pytest.raises(Stop):  # no arm of that name: the objective at its defaults
        main(["sft", "--recipe", str(MINI), "--objective", "dft", "--set", f"output_dir={tmp_path}"])
    assert spies[-1]["objective"].name == "dft"
    assert spies[-1]["checkpoints"] == str(RunLayout(tmp_path / "quickstart_mini").arm("dft").sft.checkpoints)
    bad = "arms=[{name: eksft, objective: {name: sft}}]"
    assert main(["sft", "--recipe", str(MINI), "--objective", "eksft", "--set", bad]) == 2
    assert "--objective eksft: the recipe's arm eksft trains sft; use --arm" in capsys.readouterr().err
