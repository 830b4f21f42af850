"""The stages of one recipe as a small DAG (what runs them: ``eksft.pipeline.execute``).

Per arm: ``sft`` (skipped for an arm without objective) -> ``eval:after_sft`` -> ``rl`` ->
``eval:rl_step_N`` ... -> ``eval:after_rl``. ``eval:before_sft`` of the base model is shared
by all arms (it is the same model) and copied into each arm's directory.

A recipe with ``seeds`` has these stages once per seed (``Recipe.for_seed``), named ``<arm>/seed-<s>/<stage>``:
no stage of one seed depends on another seed's, so seeds run as independent chains and resume independently.

Every stage has a *key*: a hash of the settings it reads plus the keys of the stages it
depends on. A finished stage writes ``DONE`` holding its key; a stage whose ``DONE`` key
matches is skipped, so a changed setting reruns exactly the stages that depend on it.
A stage that started with the same key and did not finish resumes from its checkpoints;
one that started with another key is cleared and starts again.

Hub sources enter the keys by commit: the pipeline plans with the recipe ``eksft.provenance.pin_revisions``
returns, so a dataset or model that changed upstream reruns the stages that read it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eksft.layout import AFTER_SFT, BASE_EVAL, BEFORE_SFT, EvalPoint, RunLayout, StageDir, eval_points, seed_dir_name


@dataclass
class Stage:
    name: str  # e.g. "eksft/sft", "eksft/eval:after_sft"
    arm: str
    kind: str  # sft | rl | eval
    out: StageDir
    settings: dict[str, Any]  # everything the stage reads, hashed into its key
    deps: list[str] = field(default_factory=list)
    key: str = ""
    point: EvalPoint | None = None  # eval stages: what they evaluate
    seed: int | None = None  # the seed it runs at (``Recipe.for_seed``); None: a recipe without ``seeds``

    def done(self) -> bool:
        marker = self.out.done_marker
        return marker.is_file() and json.loads(marker.read_text()).get("key") == self.key


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Recipe keys added after runs existed, at the value that behaves as before: left out of the hashed settings, so
# that stages finished before the key existed keep their keys (and a value that changes behaviour changes them).
ADDED_KEY_DEFAULTS = {"revision": None, "revisions": {}, "selection": "first", "tags": None, "chat_template_kwargs": {},
                      "global_batch": None, "workers": 1, "worker_cpus": None, "worker_timeout_s": 3600.0,
                      "activation_checkpointing": False, "cpu_offload": False, "num_engines": 1,
                      "tensor_parallel_size": 1, "placement": "colocated", "weight_sync": "transfer", "bucket_mb": 64.0,
                      "packing": "auto", "enforce_eager": None}
# The ``rl`` section is hashed whole (it predates ADDED_KEY_DEFAULTS): only the keys added since are left out.
# ``skip_zero_gradient`` at its default gives the update the full backward gives, summed in another order.
RL_ADDED_KEY_DEFAULTS = {"packing": "auto", "micro_batch_tokens": None, "skip_zero_gradient": True}


def _dump(section) -> dict:
    """A recipe section as hashed: ``ADDED_KEY_DEFAULTS`` at their defaults left out, at every depth."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not (k in ADDED_KEY_DEFAULTS and v == ADDED_KEY_DEFAULTS[k])}
        return obj

    return strip(section if isinstance(section, dict) else section.model_dump(mode="json"))


def _rl_section(rl) -> dict:
    """The ``rl`` section as hashed: every key, but those of `RL_ADDED_KEY_DEFAULTS` at their defaults."""
    return {k: v for k, v in rl.model_dump(mode="json").items()
            if not (k in RL_ADDED_KEY_DEFAULTS and v == RL_ADDED_KEY_DEFAULTS[k])}


def _sft_section(sft) -> dict:
    """The ``sft`` section as hashed. ``sft.workers`` replaced ``sft.num_processes`` (the same count of devices, the
    same global batch): it is hashed under the old name, so that cold starts finished before keep their keys."""
    section = _dump(sft)
    section.pop("workers", None)
    section["num_processes"] = sft.workers
    return section


def _rollout_section(rollout) -> dict:
    """The ``rollout`` section as hashed. ``num_cpus`` unset (the engines share the stage's CPUs) replaced the old
    default 1, which an engine in the stage's own process never read: it is hashed as 1, so that stages finished
    before keep their keys."""
    section = _dump(rollout)
    if section.get("num_cpus") is None:
        section["num_cpus"] = 1.0
    return section


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
    layout = RunLayout(Path(run_dir))
    stages = [stage for seed in recipe.run_seeds for stage in _seed_stages(recipe.for_seed(seed), seed, layout, precision)]
    by_name = {s.name: s for s in stages}
    for s in stages:  # in dependency order, so upstream keys exist
        s.key = stable_hash({"settings": s.settings, "deps": [by_name[d].key for d in s.deps]})
    return stages


def _seed_stages(recipe, seed: int | None, layout: RunLayout, precision) -> list[Stage]:
    """The stages of every arm at one seed (``recipe``: ``Recipe.for_seed(seed)``, whose seeds enter the keys)."""
    prefix = "" if seed is None else f"{seed_dir_name(seed)}/"  # stage names: <arm>/[seed-<s>/]<stage>
    base = {
        "model": _dump(recipe.model),
        "seed": recipe.seed,
        "prompting": _dump({"instruction": recipe.data.instruction, "system_prompt": recipe.data.system_prompt,
                            "chat_template_kwargs": recipe.data.chat_template_kwargs}),
    }
    evaluation = {"eval": _dump(recipe.eval), "rollout": _rollout_section(recipe.rollout), **base}

    def eval_stage(arm_name: str, point: EvalPoint, deps: list[str], arm=None) -> Stage:
        return Stage(f"{arm_name}/{prefix}eval:{point.name}", arm_name, "eval", layout.arm(arm_name, seed).eval(point),
                     {**evaluation, "point": point.name, "precision": precision(arm, "eval")}, seed=seed, deps=deps,
                     point=point)

    stages: list[Stage] = [eval_stage(BASE_EVAL, BEFORE_SFT, [])]
    for arm in recipe.arms:
        arm_dir = layout.arm(arm.name, seed)
        start_dep = stages[0].name
        if arm.objective is not None:
            sft_settings = {**base, "data": _dump(recipe.data),
                            "sft": {**_sft_section(recipe.sft), "objective": arm.objective.model_dump(mode="json")},
                            "precision": precision(arm, "sft")}
            stages.append(Stage(f"{arm.name}/{prefix}sft", arm.name, "sft", arm_dir.sft, sft_settings, seed=seed))
            stages.append(eval_stage(arm.name, AFTER_SFT, [stages[-1].name], arm))
            start_dep = stages[-2].name
        rl_cfg = recipe.arm_rl(arm)
        stages.append(Stage(f"{arm.name}/{prefix}rl", arm.name, "rl", arm_dir.rl,
                            {**base, "data_rl": _dump(recipe.data.rl),
                             "rl": _rl_section(rl_cfg), "rollout": _rollout_section(recipe.rollout),
                             "precision": precision(arm, "rl")},
                            seed=seed, deps=[start_dep]))
        rl_stage = stages[-1].name
        for point in eval_points(rl_cfg.steps, recipe.eval.every_rl_steps):
            stages.append(eval_stage(arm.name, point, [rl_stage], arm))
    return stages
