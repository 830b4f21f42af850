"""Typed recipe schema: YAML -> validated pydantic models with defaults.

A recipe error names the key's full path and what is allowed there, e.g.
``recipe.yaml: data.sft.fromat: unknown key (allowed: source, format, ...)``.
``--set a.b=c`` overrides are applied to the raw YAML before validation, so they are
checked exactly like keys written in the file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from eksft.data.config import DataConfig
from eksft.eval.config import EvalConfig
from eksft.objectives import ObjectiveConfig
from eksft.schema import Strict
from rl.common import lora
from rl.grpo.config import GRPOConfig
from rl.rollout.base import RolloutConfig


class RecipeError(ValueError):
    """A recipe that does not validate; the message names the key path and what is allowed."""


class ModelConfig(Strict):
    name: str = Field(
        "embedded:smollm2-135m-instruct",
        description="HF hub id, local directory, 'embedded:smollm2-135m-instruct' or 'tiny:qwen2' / 'tiny:llama'",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights of the SFT stage (the GRPO trainer keeps float32 weights, rl.lora.base_dtype "
                               "aside; engines compute in rollout.dtype)")
    trust_remote_code: bool = False
    revision: str | None = Field(
        None, description="hub commit, tag or branch of a hub model; the pipeline pins a hub model to the commit it "
                          "resolves to and records it in run.json")


class LoraSettings(lora.LoraSettings):
    """The cold start's LoRA: the shared settings (rl.common.lora), with dropout 0.05 (GRPO keeps 0)."""

    dropout: lora.LoraDropout = 0.05


class SFTConfig(Strict):
    """The cold-start stage; defaults follow the authors' script (docs/method.md, EKSFT objective). The objective is
    an arm's (``arms[].objective``): each arm trains its own with these settings."""

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
    packing: Literal["auto", "on", "off"] = Field(
        "auto", description="on: each micro-batch as one packed row without padding, the prompt every sequence shares "
                            "computed once (same loss and gradients; rl.common.packing); off: padded rows; auto: as "
                            "rl.packing decides for the device kind (rl.common.packing.PACKING_BY_DEVICE)")
    gradient_checkpointing: bool = Field(False, description="recompute each decoder layer's activations in the "
                                                            "backward (less memory, ~1/3 more compute)")
    # Objectives that need no reference (sft, dft) still log KL to the starting model every N steps (0: never).
    kl_metric_every: int = Field(10, ge=0)
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(500, gt=0)
    save_total_limit: int | None = Field(2, gt=0)
    workers: int = Field(1, ge=1, description="trainer ranks (FSDP2: policy, reference and AdamW sharded; one GPU "
                                              "each): 1 = one rank in the stage's process, N > 1 = N Ray actors on "
                                              "one node or several; batch_size is per worker")
    worker_cpus: float | None = Field(
        None, gt=0, description="CPUs each Ray trainer worker reserves (sft.workers > 1); None: the workers run "
                                "inside the stage's own CPUs (a token Ray share each, threads = the stage's / workers)")
    worker_timeout_s: float = Field(3600.0, gt=0, description="a call to the Ray trainer workers that takes longer "
                                                              "fails the stage (a hung rank)")
    # The recipe's statement of its global batch (sequences per optimizer step), checked against
    # workers x batch_size x grad_accum.
    global_batch: int | None = Field(None, gt=0)

    @field_validator("packing", mode="before")
    @classmethod
    def _packing(cls, v):
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML reads on / off as booleans

    @model_validator(mode="before")
    @classmethod
    def _num_processes_is_gone(cls, data):
        if isinstance(data, dict) and "num_processes" in data:
            n = data["num_processes"]
            raise ValueError(f"num_processes was replaced by workers: write `workers: {n}` (the cold start runs on "
                             f"{n} FSDP2 trainer workers, Ray actors, one GPU each; no torchrun)")
        return data

    @model_validator(mode="after")
    def _adapter_needs_lora(self):
        if self.reference == "adapter" and not self.lora.enabled:
            raise ValueError("reference: adapter needs lora.enabled: true (the reference is the base with adapters off)")
        return self

    @model_validator(mode="after")
    def _global_batch_is_the_product(self):
        if self.global_batch is not None and self.global_batch != self.sequences_per_step():
            raise ValueError(f"global_batch is {self.global_batch}, but {self.describe_global_batch()}")
        return self

    def sequences_per_step(self) -> int:
        """The global batch: ``workers`` x ``batch_size`` x ``grad_accum``."""
        return self.workers * self.batch_size * self.grad_accum

    def describe_global_batch(self) -> str:
        return (f"global batch = {self.workers} worker{'s' if self.workers > 1 else ''} x batch_size "
                f"{self.batch_size} x grad_accum {self.grad_accum} = {self.sequences_per_step()} sequences per "
                "optimizer step")


class ArmConfig(Strict):
    """One arm of the experiment: a cold-start objective (none: RL straight from the base model) + RL overrides."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # "_..." is reserved (e.g. _base)
    objective: ObjectiveConfig | None = None
    # Keys of the recipe's `rl` section to change for this arm only, e.g. {learning_rate: 2.0e-6}.
    rl: dict[str, Any] = Field(default_factory=dict)


class StageResources(Strict):
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    memory_gib: float | None = Field(
        None, gt=0, description="host memory the stage's process needs (GiB): `eksft run` starts a stage only when "
                                "the running stages' memory plus its own fits Ray's `memory` capacity; None: not counted")
    worker_memory_gib: float | None = Field(
        None, gt=0, description="host memory of each Ray trainer worker of the stage (rl.workers > 1), added to "
                                "memory_gib: the stage and its workers are admitted together (no stage holds its "
                                "share while waiting for its workers')")
    engine_memory_gib: float | None = Field(
        None, gt=0, description="host memory of each rollout engine actor of an RL or evaluation stage whose engines "
                                "run in Ray actors (rollout.num_engines > 1, placement: separate or use_ray), added "
                                "to memory_gib: weights, the KV cache (rollout.kv_cache_gib) and vLLM's own")


class ResourcesConfig(Strict):
    """What each stage asks Ray for; arms run concurrently when the cluster has room."""

    sft: StageResources = StageResources()
    rl: StageResources = StageResources()
    eval: StageResources = StageResources()


class ReportConfig(Strict):
    """How ``eksft report`` compares the arms (it reads this from run.json; no stage depends on it)."""

    baseline_arm: str | None = Field(
        None, description="the arm every other arm is compared with (the table's Δ column: paired over the same "
                          "problems); None: the first arm whose objective is sft, else the first arm")
    level: float = Field(0.95, gt=0, lt=1, description="coverage of the intervals (percentile bootstrap)")
    n_boot: int = Field(2000, ge=100, description="bootstrap resamples, and random sign flips of the paired test")


# As written in a recipe: `--set arms.<name>...` on a recipe without `arms` edits a copy of these.
DEFAULT_ARMS: list[dict[str, Any]] = [{"name": "sft", "objective": {"name": "sft"}},
                                      {"name": "eksft", "objective": {"name": "eksft"}}]


class Recipe(Strict):
    name: str = "recipe"
    seed: int = Field(0, description="seed of the SFT stage (rl.seed and eval.seed seed the others)")
    seeds: list[int] | None = Field(
        None, min_length=1,
        description="run every arm once per seed, e.g. [0, 1, 2] (unset: once, with `seed`). Seed s runs with "
                    "seed = s and rl.seed, eval.seed shifted by s - seed: the SFT data order, the RL prompt order and "
                    "sampling and the evaluation sampling change; the data and the evaluation problems do not, so "
                    "results pair by problem. Each seed has its own directory (<arm>/seed-<s>/) and stages")
    output_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    rl: GRPOConfig = GRPOConfig()
    rollout: RolloutConfig = RolloutConfig()
    # Metrics go to metrics.jsonl and the console always; also to these trackers when listed.
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    arms: list[ArmConfig] = Field(default_factory=lambda: [ArmConfig.model_validate(a) for a in DEFAULT_ARMS])
    eval: EvalConfig = EvalConfig()
    resources: ResourcesConfig = ResourcesConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _arms_are_consistent(self):
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        if self.report.baseline_arm is not None and self.report.baseline_arm not in names:
            raise ValueError(f"report.baseline_arm: no arm is called {self.report.baseline_arm!r} "
                             f"(arms: {', '.join(names)})")
        for i, arm in enumerate(self.arms):
            try:
                self.arm_rl(arm)
            except ValidationError as e:
                bad = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
                raise ValueError(f"arms.{i}.rl ({arm.name}): {bad} (allowed keys: {', '.join(sorted(GRPOConfig.model_fields))})") from None
        if self.seeds is not None:
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError(f"seeds must be distinct, got {self.seeds}")
            low = min(self.seeds) - self.seed + self.rl.seed
            if low < 0:  # rl.seed must be >= 0
                raise ValueError(f"seeds: seed {min(self.seeds)} would run with rl.seed {self.rl.seed} + "
                                 f"({min(self.seeds)} - seed {self.seed}) = {low} < 0; raise rl.seed or lower seed")
        every = self.eval.every_rl_steps
        # Each arm saves RL checkpoints at its own rl.save_every (an arm may override it).
        for where, rl in [("", self.rl), *((f" of arm {a.name}", self.arm_rl(a)) for a in self.arms if a.rl)]:
            if every and every % rl.save_every:
                raise ValueError(f"eval.every_rl_steps ({every}) must be a multiple of rl.save_every{where} "
                                 f"({rl.save_every}): intermediate evaluations read the RL checkpoints")
        return self

    @property
    def run_seeds(self) -> list[int | None]:
        """The seeds the arms run with, as the run directory names them: ``[None]`` when ``seeds`` is unset (one
        run with ``seed``, no seed level in the layout), else ``seeds``."""
        return [None] if self.seeds is None else list(self.seeds)

    def for_seed(self, seed: int | None) -> Recipe:
        """The recipe one seed of the run executes: ``seed`` = ``seed``, ``rl.seed`` and ``eval.seed`` shifted by
        ``seed - self.seed`` (so ``seeds: [seed]`` runs exactly what the recipe without ``seeds`` runs). ``None``:
        the recipe itself."""
        if seed is None:
            return self
        if self.seeds is not None and seed not in self.seeds:
            raise RecipeError(f"seed {seed} is not one of the recipe's seeds {self.seeds}")
        shift = seed - self.seed
        return self.model_copy(update={"seed": seed,
                                       "rl": self.rl.model_copy(update={"seed": self.rl.seed + shift}),
                                       "eval": self.eval.model_copy(update={"seed": self.eval.seed + shift})})

    def arm(self, name: str) -> ArmConfig:
        """The arm called ``name``; the error lists the recipe's arms."""
        arm = next((a for a in self.arms if a.name == name), None)
        if arm is None:
            raise RecipeError(f"--arm {name}: no such arm (arms: {', '.join(a.name for a in self.arms)})")
        return arm

    def arm_rl(self, arm: ArmConfig) -> GRPOConfig:
        """The recipe's RL settings with the arm's overrides merged in, key by key at every depth (validated)."""
        return GRPOConfig.model_validate(_merged(self.rl.model_dump(), arm.rl))


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied; a section in both is merged (``{lora: {r: 4}}`` keeps ``lora.enabled``)."""
    out = dict(base)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


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
    """Apply ``a.b.c=value`` (value parsed as YAML, so numbers and booleans get their types).

    In a list of named sections (``arms``) a component selects the item by its ``name``:
    ``arms.eksft.objective.ratio=0.3``. A recipe without ``arms`` gets the default arms first, so that they
    can be addressed the same way.
    """
    if "=" not in item:
        raise RecipeError(f"--set expects key.path=value, got {item!r}")
    key, _, text = item.partition("=")
    key = key.strip()
    parts = [k for k in key.split(".") if k]
    if not parts:
        raise RecipeError(f"--set expects key.path=value, got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"--set {key}: the value {text!r} is not valid YAML ({problem}); "
                          f"quote it to pass a string, e.g. --set {key}='\"...\"'") from None
    if parts[0] == "arms" and len(parts) > 1 and "arms" not in raw:
        raw["arms"] = copy.deepcopy(DEFAULT_ARMS)
    node: Any = raw
    i = 0
    while True:
        if isinstance(node, list):
            index, i = _named_item(node, parts, i, key)
            if i == len(parts):
                node[index] = value
                return
            node = node[index]
        elif i == len(parts) - 1:
            node[parts[i]] = value
            return
        else:
            node = node.setdefault(parts[i], {})
            i += 1
        if not isinstance(node, (dict, list)):
            raise RecipeError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section")


def _named_item(items: list, parts: list[str], i: int, key: str) -> tuple[int, int]:
    """(index of the item of ``items`` that ``parts[i:]`` starts with the name of, the next part's index).

    Names may contain dots (``eksft_r0.1_union``): the longest name that matches wins.
    """
    where = ".".join(parts[:i])
    if not all(isinstance(it, dict) and "name" in it for it in items):
        raise RecipeError(f"--set {key}: {where} is a list without names: set it whole, e.g. --set {where}=[...]")
    names = [str(it["name"]) for it in items]
    for j in range(len(parts), i, -1):
        if ".".join(parts[i:j]) in names:
            return names.index(".".join(parts[i:j])), j
    raise RecipeError(f"--set {key}: {where} has no item named {parts[i]!r} ({where}: {', '.join(names)})")


# Keys that moved: their unknown-key error says where they live now.
MOVED_KEYS = {("sft", "objective"): "objectives belong to arms: arms[].objective "
                                    "(e.g. --set arms.eksft.objective.ratio=0.3)"}


def format_validation_error(err: ValidationError, root: type[BaseModel], where: str) -> str:
    lines = []
    for e in err.errors():
        loc, models = _fields_at(root, e["loc"])
        path = ".".join(loc) or "<top level>"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(sorted({f for m in _fields_at(root, e["loc"][:-1])[1] for f in m.model_fields}))
            moved = MOVED_KEYS.get(tuple(loc))
            lines.append(f"{where}: {path}: unknown key (allowed: {allowed})" + (f"; {moved}" if moved else ""))
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
