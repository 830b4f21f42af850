"""Typed recipe schema: YAML -> validated pydantic models with defaults.

A recipe error names the key's full path and what is allowed there, e.g.
``recipe.yaml: data.sft.fromat: unknown key (allowed: source, format, ...)``.
``--set a.b=c`` overrides are applied to the raw YAML before validation, so they are
checked exactly like keys written in the file.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from eksft.data.formats import BOXED_ANSWER_INSTRUCTION
from eksft.eval.config import EvalConfig
from eksft.objectives import EKSFTSettings, ObjectiveConfig, SFTSettings
from rl.common import lora
from rl.grpo.config import GRPOConfig
from rl.rollout.base import RolloutConfig


class RecipeError(ValueError):
    """A recipe that does not validate; the message names the key path and what is allowed."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    name: str = Field(
        "embedded:smollm2-135m-instruct",
        description="HF hub id, local directory, 'embedded:smollm2-135m-instruct' or 'tiny:qwen2' / 'tiny:llama'",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


class DataSource(Strict):
    source: str = Field(
        "embedded:arithmetic",
        description="hub id, local .jsonl/.json/.parquet file, or 'embedded:<generator>'",
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "problem_solution", "problem_answer"] = "auto"
    split: str = "train"
    num_examples: int | None = Field(None, gt=0, description="first N rows (embedded generators: how many to make, default 256)")
    seed: int = 0
    # Rename fields of the source to the canonical ones, e.g. {problem: question}.
    fields: dict[str, str] = Field(default_factory=dict)


class DataConfig(Strict):
    sft: DataSource = DataSource(source="embedded:arithmetic", num_examples=256)
    rl: DataSource = DataSource(source="embedded:arithmetic", num_examples=256, seed=1)
    max_length: int = Field(1024, gt=8)
    system_prompt: str | None = None
    # Appended to every problem when a prompt is built from {problem, ...} rows.
    instruction: str = BOXED_ANSWER_INSTRUCTION


class LoraSettings(lora.LoraSettings):
    """The cold start's LoRA: the shared settings (rl.common.lora), with dropout 0.05 (GRPO keeps 0)."""

    dropout: lora.LoraDropout = 0.05


class SFTConfig(Strict):
    """The cold-start stage; defaults follow the authors' script (docs/method.md, EKSFT objective)."""

    objective: ObjectiveConfig = EKSFTSettings()
    # copy: a frozen copy of the starting model; adapter: the LoRA base with adapters disabled (no second copy).
    reference: Literal["copy", "adapter"] = "copy"
    lora: LoraSettings = LoraSettings()
    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.01, ge=0, lt=1)
    epochs: float = Field(8, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (overrides epochs)")
    batch_size: int = Field(1, gt=0, description="sequences per micro-batch (per device)")
    grad_accum: int = Field(1, gt=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # bf16 autocast (weights and AdamW stay in model.dtype); auto: bf16 where the device computes it natively
    # (rl.common.precision), float32 elsewhere.
    bf16: Literal["auto"] | bool = "auto"
    gradient_checkpointing: bool = False
    # Objectives that need no reference (sft, dft) still log KL to the starting model every N steps (0: never).
    kl_metric_every: int = Field(10, ge=0)
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(500, gt=0)
    save_total_limit: int | None = Field(2, gt=0)
    # > 1: data parallel under torchrun, one process per GPU (gloo processes on CPU); batch_size is per process.
    num_processes: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _adapter_needs_lora(self):
        if self.reference == "adapter" and not self.lora.enabled:
            raise ValueError("reference: adapter needs lora.enabled: true (the reference is the base with adapters off)")
        return self


class ArmConfig(Strict):
    """One arm of the experiment: a cold-start objective (none: RL straight from the base model) + RL overrides."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # "_..." is reserved (e.g. _base)
    objective: ObjectiveConfig | None = None
    # Keys of the recipe's `rl` section to change for this arm only, e.g. {learning_rate: 2.0e-6}.
    rl: dict[str, Any] = Field(default_factory=dict)


class StageResources(Strict):
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)


class ResourcesConfig(Strict):
    """What each stage asks Ray for; arms run concurrently when the cluster has room."""

    sft: StageResources = StageResources()
    rl: StageResources = StageResources()
    eval: StageResources = StageResources()


DEFAULT_ARMS = [ArmConfig(name="sft", objective=SFTSettings()), ArmConfig(name="eksft", objective=EKSFTSettings())]


class Recipe(Strict):
    name: str = "recipe"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    rl: GRPOConfig = GRPOConfig()
    rollout: RolloutConfig = RolloutConfig()
    # Metrics go to metrics.jsonl and the console always; also to these trackers when listed.
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    arms: list[ArmConfig] = Field(default_factory=lambda: list(DEFAULT_ARMS))
    eval: EvalConfig = EvalConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _arms_are_consistent(self):
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        for i, arm in enumerate(self.arms):
            try:
                self.arm_rl(arm)
            except ValidationError as e:
                bad = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
                raise ValueError(f"arms.{i}.rl ({arm.name}): {bad} (allowed keys: {', '.join(sorted(GRPOConfig.model_fields))})") from None
        gpus, procs = self.resources.sft.num_gpus, self.sft.num_processes
        if gpus and procs > 1 and procs != gpus:
            raise ValueError(f"sft.num_processes ({procs}) must equal resources.sft.num_gpus ({gpus:g}): one process per GPU")
        every = self.eval.every_rl_steps
        if every and every % self.rl.save_every:
            raise ValueError(f"eval.every_rl_steps ({every}) must be a multiple of rl.save_every ({self.rl.save_every}): "
                             "intermediate evaluations read the RL checkpoints")
        return self

    def for_arm(self, name: str) -> "Recipe":
        """This recipe with ``sft.objective`` set to the named arm's objective (what that arm's SFT stage trains)."""
        arm = next((a for a in self.arms if a.name == name), None)
        if arm is None:
            raise RecipeError(f"--arm {name}: no such arm (arms: {', '.join(a.name for a in self.arms)})")
        if arm.objective is None:
            raise RecipeError(f"--arm {name}: this arm has no cold-start objective (it starts RL from the base model)")
        return self.model_copy(update={"sft": self.sft.model_copy(update={"objective": arm.objective})})

    def arm_rl(self, arm: ArmConfig) -> GRPOConfig:
        """The recipe's RL settings with the arm's overrides applied (validated)."""
        return GRPOConfig.model_validate({**self.rl.model_dump(), **arm.rl})


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (or the defaults when ``path`` is None), apply ``key.path=value`` overrides, validate."""
    where = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{where}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise RecipeError(f"{where}: the top level must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return validate_recipe(raw, where)


def validate_recipe(raw: dict[str, Any], where: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, Recipe, where)) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML, so numbers and booleans get their types)."""
    if "=" not in item:
        raise RecipeError(f"--set expects key.path=value, got {item!r}")
    key, _, text = item.partition("=")
    parts = [k for k in key.strip().split(".") if k]
    if not parts:
        raise RecipeError(f"--set expects key.path=value, got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"--set {key.strip()}: the value {text!r} is not valid YAML ({problem}); "
                          f"quote it to pass a string, e.g. --set {key.strip()}='\"...\"'") from None
    node = raw
    for i, k in enumerate(parts[:-1]):
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def format_validation_error(err: ValidationError, root: type[BaseModel], where: str) -> str:
    lines = []
    for e in err.errors():
        loc, models = _fields_at(root, e["loc"])
        path = ".".join(loc) or "<top level>"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(sorted({f for m in _fields_at(root, e["loc"][:-1])[1] for f in m.model_fields}))
            lines.append(f"{where}: {path}: unknown key (allowed: {allowed})")
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            # A union told apart by one key (an objective's `name`): the error is that key's.
            key = e["ctx"]["discriminator"].strip("'")
            got = e["input"].get(key) if isinstance(e["input"], dict) else None
            allowed = ", ".join(sorted(m.model_fields[key].default for m in models))
            problem = "missing" if got is None else f"unknown {loc[-1]} {got!r}"
            lines.append(f"{where}: {path}.{key}: {problem}; allowed: {allowed}")
        else:
            got = e.get("input")
            shown = f" (got {got!r:.80})" if not isinstance(got, (dict, list)) else ""
            lines.append(f"{where}: {path}: {e['msg'].removeprefix('Value error, ')}{shown}")
    return "\n".join(lines)


def _fields_at(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], list[type[BaseModel]]]:
    """Walk ``loc`` from ``root``: the key path as the recipe spells it, and the models found there.

    Inside a union told apart by a key, pydantic adds the chosen member's tag to the location
    (``arms.0.objective.eksft.ratio``); the recipe has no such key, so the path leaves it out.
    """
    path: list[str] = []
    types: list[Any] = [root]
    for key in loc:
        models = [t for t in _members(types) if isinstance(t, type) and issubclass(t, BaseModel)]
        tagged = [m for m in models if key not in m.model_fields
                  and any(get_args(f.annotation) == (key,) for f in m.model_fields.values())]
        path += [] if tagged else [str(key)]
        types = tagged or [m.model_fields[key].annotation for m in models if key in m.model_fields] or [
            get_args(t)[0] for t in _members(types) if isinstance(key, int) and get_origin(t) is list]
    return path, [t for t in _members(types) if isinstance(t, type) and issubclass(t, BaseModel)]


def _members(types: list[Any]) -> list[Any]:
    """The alternatives of each type: ``Annotated``, ``X | Y`` and ``Optional`` unwrapped."""
    out = []
    for t in types:
        origin = get_origin(t)
        inner = get_args(t)[:1] if origin is Annotated else get_args(t) if origin in (Union, UnionType) else ()
        out += _members(list(inner)) if inner else [t]
    return out


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
