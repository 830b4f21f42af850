"""The three stages, one function each, called by the command line (``eksft sft | rl | eval``) and by the
pipeline (``eksft run``) alike: the callers choose the arm and the places, the stage does the rest.

    sft_stage(recipe, arm, out)                          -> the arm's cold start (arm.objective), out.checkpoint
    rl_stage(recipe, arm, start_model, out)              -> GRPO with the arm's rl settings, out.checkpoint
    eval_stage(recipe, model, out_dir, point)            -> {benchmark: result} with the recipe's eval settings

What an arm starts from and what each evaluation point evaluates is decided here too (``arm_start_model``,
``model_at``), so that ``eksft rl --arm A`` and ``eksft run`` train the same thing.
"""

from __future__ import annotations

from pathlib import Path

from eksft.layout import AFTER_RL, AFTER_SFT, BEFORE_SFT, ArmDir, EvalPoint, RLStageDir, SFTStageDir


def sft_stage(recipe, arm, out: SFTStageDir) -> Path:
    """Train ``arm.objective`` with the recipe's ``sft`` settings (resuming from ``out``); returns the checkpoint."""
    from eksft.config import RecipeError
    from eksft.sft import run_sft

    if arm.objective is None:
        raise RecipeError(f"arm {arm.name} has no cold-start objective (it starts RL from the base model)")
    return run_sft(recipe, arm.objective, out)  # writes out.masks too


def rl_stage(recipe, arm, start_model: str, out: RLStageDir, *, step_offset: int = 0) -> Path:
    """GRPO from ``start_model`` (a name or directory) with the recipe's ``rl`` settings and the arm's overrides;
    returns the checkpoint.

    KL is measured to the recipe's base model in both phases (one timeline per arm), whatever the start.
    ``step_offset``: the SFT steps before it, so that trackers draw one timeline.
    """
    from eksft.data import load_prompt_answer_rows
    from eksft.tracking import make_trackers
    from rl.grpo import run_grpo

    rows = load_prompt_answer_rows(recipe.data, recipe.data.rl)
    trackers = make_trackers(recipe.report_to, out.tensorboard, f"{recipe.name}-{arm.name}-rl",
                             recipe.model_dump(mode="json"), step_offset=step_offset)
    return run_grpo(model_dir(recipe, start_model), rows, recipe.arm_rl(arm), out.trainer_outputs(), rollout=recipe.rollout,
                    reference_dir=model_dir(recipe, recipe.model.name), trust_remote_code=recipe.model.trust_remote_code,
                    trackers=trackers, chat_template_kwargs=recipe.data.chat_template_kwargs)


def eval_stage(recipe, model: str, out_dir: Path | None, point: str | None, *, progress: bool = True) -> dict:
    """Evaluate ``model`` (a name or directory) with the recipe's ``eval``, ``rollout`` and prompt settings;
    writes one JSON per benchmark into ``out_dir`` (when given) labelled ``point``."""
    from eksft.eval.runner import evaluate

    return evaluate(model_dir(recipe, model), recipe.eval.benchmarks, recipe.eval, rollout_cfg=recipe.rollout,
                    data_cfg=recipe.data, out_dir=out_dir, point=point, model_name=model,
                    trust_remote_code=recipe.model.trust_remote_code, progress=progress)


def model_dir(recipe, model: str) -> str:
    """``resolve_model_dir`` of ``model``, at the recipe's ``model.revision`` when it is the recipe's model."""
    from eksft.models import resolve_model_dir

    return resolve_model_dir(model, recipe.model.revision if model == recipe.model.name else None)


def arm_start_model(recipe, arm, arm_dir: ArmDir) -> str:
    """What the arm's RL starts from: its SFT checkpoint, or the base model for an arm without objective."""
    return recipe.model.name if arm.objective is None else str(arm_dir.sft.checkpoint)


def model_at(recipe, arm, arm_dir: ArmDir, point: EvalPoint) -> str:
    """The model an evaluation point of the arm evaluates (``arm`` None: the base model's shared evaluation)."""
    if arm is None or point == BEFORE_SFT:
        return recipe.model.name
    if point == AFTER_SFT:
        return arm_start_model(recipe, arm, arm_dir)
    if point == AFTER_RL:
        return str(arm_dir.rl.checkpoint)
    return str(arm_dir.rl.step_checkpoint(point.rl_step))
