"""Where every stage of a recipe runs and how much memory each GPU needs, before anything starts (``eksft plan``).

    cluster = Cluster.gpus(nodes=1, gpus_per_node=8, gpu_memory_gib=80)     # or detect_cluster(), Cluster.cpu(...)
    report = plan_memory(recipe, cluster)                                    # -> MemoryPlan
    print(report.format()); report.fits; report.refusal()                    # the message naming stage, GPU, shortfall

Per stage, not per run: each kind of stage (and each arm whose settings differ) is placed alone on the whole
cluster, as if nothing else ran. Arms that run concurrently share the cluster in time (the driver admits a stage
only when Ray has its CPUs and GPUs free), so what must fit is one stage on its GPUs; whether two arms can run at
once is the driver's admission, not this check.

Placement, as the code places things (``eksft.pipeline.driver``, ``rl.workers``, ``rl.rollout``):

* the stage's own process holds ``resources.<kind>.num_gpus`` GPUs (rounded up), the first free ones;
* trainer ranks: ``workers: 1`` is the stage's own process, on the stage's GPU (no GPU: it trains on the CPU,
  in host memory); ``workers`` N > 1 are N Ray actors, one GPU each, in a ``PACK`` placement group: the next free
  GPUs of the node, spilling onto the next node;
* engines: one engine with ``placement: colocated`` (and not ``use_ray``) runs in the stage's own process, on
  its GPU; otherwise ``num_engines`` Ray actors of ``rollout.num_gpus x tensor_parallel_size`` GPUs each, all of
  an engine's GPUs on one node, after the trainer's. ``rollout.num_gpus: 0``: the engines run on the CPU.
* a colocated engine and the trainer of an RL stage's own process (``rl.workers: 1``) share its GPU in turns: the
  engine is made with vLLM's sleep mode and sleeps at level 2 (weights and KV cache dropped) while the trainer
  updates (`rl.grpo.trainer.GRPOTrainer._update_and_sync`), while the trainer's resident state (sharded weights,
  gradients, AdamW state, reference) stays allocated while the engine generates. That GPU needs the larger of
  the trainer's peak and its resident state plus the engine's peak, and one process's runtime. An evaluation's
  engine, and an engine in the controller's process beside Ray trainer workers, have their GPU to themselves.

On a CPU-only cluster the one "GPU" is the node's host memory, and every process of the stage adds onto it.

Each process on a GPU also counts ``RUNTIME_GIB`` (CUDA context, NCCL and allocator slack; on a CPU the Python,
torch and vLLM runtime): an assumption, not a formula. A GPU fits when the sum is at most its memory.

Precision: ``auto`` resolves as the workers would: on a planned GPU cluster the GPUs are assumed to compute bf16
natively (sm_80 or newer: the 80 GB GPUs all do); on this machine's CPU as ``rl.common.precision`` decides.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eksft.pipeline.memory import (
    CPU_BLOCK_SIZE,
    GPU,
    GPU_BLOCK_SIZE,
    HOST,
    RESIDENT,
    Estimate,
    LoraShape,
    MicroBatchShape,
    ModelShape,
    TrainerSetup,
    engine_estimate,
    kv_blocks,
    trainer_estimate,
)

__all__ = ["Cluster", "Device", "KNOWN_CONFIGS", "MemoryPlan", "ModelConfigError", "Process", "StagePlan",
           "detect_cluster", "model_shape", "plan_memory", "PROMPT_TOKENS", "RUNTIME_GIB", "NOT_FIT_EXIT"]

GIB = 2**30
RUNTIME_GIB = 1.0  # per process on a device: CUDA context, NCCL, allocator slack (GPU); Python/torch/vLLM (CPU)
PROMPT_TOKENS = 512  # assumed prompt length of RL and evaluation prompts (recipes do not bound it)
NOT_FIT_EXIT = 3  # `eksft plan` / `eksft run`: the plan does not fit (2 is a recipe error)

# The published config.json of models recipes name, for machines without the hub (the keys that shape the model).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-8B": {"model_type": "qwen3", "num_hidden_layers": 36, "hidden_size": 4096,
                      "intermediate_size": 12288, "num_attention_heads": 32, "num_key_value_heads": 8,
                      "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False, "attention_bias": False},
    "Qwen/Qwen3-1.7B": {"model_type": "qwen3", "num_hidden_layers": 28, "hidden_size": 2048,
                        "intermediate_size": 6144, "num_attention_heads": 16, "num_key_value_heads": 8,
                        "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True, "attention_bias": False},
    "embedded:smollm2-135m-instruct": {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
                                       "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                                       "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True,
                                       "attention_bias": False, "mlp_bias": False},
}


class ModelConfigError(ValueError):
    """No config.json could be found for the recipe's model."""


def model_shape(name: str, revision: str | None = None, model_config: str | Path | None = None) -> ModelShape:
    """The shape of model ``name``: from ``model_config`` (a config.json or a directory holding one) when given,
    else a local directory's config.json, the HF cache's (no download), the published numbers of `KNOWN_CONFIGS`,
    or the tiny test models' configs."""
    if model_config is not None:
        path = Path(model_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ModelConfigError(f"--model-config {model_config}: no such file")
        return ModelShape.from_hf_config(json.loads(path.read_text()))
    local = Path(name).expanduser()
    if (local / "config.json").is_file():
        return ModelShape.from_hf_config(json.loads((local / "config.json").read_text()))
    if name.count("/") == 1 and not name.startswith((".", "/")):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json", revision=revision)
        except Exception:  # noqa: BLE001  (an unusable cache is the same as none)
            cached = None
        if isinstance(cached, str) and Path(cached).is_file():
            return ModelShape.from_hf_config(json.loads(Path(cached).read_text()))
    if name in KNOWN_CONFIGS:
        return ModelShape.from_hf_config(KNOWN_CONFIGS[name])
    if name.startswith("tiny:"):
        from eksft.models.tiny import build_config, build_tokenizer

        return ModelShape.from_hf_config(build_config(name.removeprefix("tiny:"), build_tokenizer()).to_dict())
    raise ModelConfigError(
        f"model {name!r}: no config.json found (not a local directory, not in the HF cache, not one of the known "
        f"models: {', '.join(KNOWN_CONFIGS)}); give its config with --model-config PATH (a config.json, or a "
        "directory holding one)")


# --------------------------------------------------------------------------- the cluster


@dataclass(frozen=True)
class Cluster:
    """``nodes`` x ``gpus_per_node`` GPUs of ``gpu_memory_gib`` each; ``gpus_per_node`` 0: CPU only, each node's
    host memory ``host_memory_gib`` is its one device. ``source``: where the numbers come from (printed)."""

    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float = 0.0
    host_memory_gib: float | None = None
    source: str = "given"

    @classmethod
    def gpus(cls, nodes: int, gpus_per_node: int, gpu_memory_gib: float, source: str = "given") -> Cluster:
        return cls(nodes, gpus_per_node, gpu_memory_gib, None, source)

    @classmethod
    def cpu(cls, host_memory_gib: float, nodes: int = 1, source: str = "given") -> Cluster:
        return cls(nodes, 0, 0.0, host_memory_gib, source)

    @property
    def has_gpus(self) -> bool:
        return self.gpus_per_node > 0

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        if self.has_gpus:
            where = f"{self.nodes} node{'s' if self.nodes > 1 else ''} x " if self.nodes > 1 else ""
            return f"{where}{self.gpus_per_node} GPU{'s' if self.gpus_per_node > 1 else ''} of " \
                   f"{self.gpu_memory_gib:g} GiB ({self.source})"
        return f"CPU only, {self.host_memory_gib:.1f} GiB of host memory ({self.source})"


def host_memory_gib() -> float:
    """This machine's total RAM (/proc/meminfo MemTotal)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def detect_cluster(gpus: int | None = None, gpu_memory_gib: float | None = None, nodes: int | None = None,
                   cpu_memory_gib: float | None = None) -> Cluster:
    """The cluster to plan for. Flags win: ``gpus`` (per node) with ``gpu_memory_gib``, ``nodes`` (default 1);
    ``gpus`` 0 (or ``cpu_memory_gib`` alone): CPU only. Without flags: the Ray cluster at ``RAY_ADDRESS`` when it
    is set (connects, never starts one), else this machine (its GPUs as torch sees them, else its RAM)."""
    if gpus is not None or gpu_memory_gib is not None:
        if gpus is None or (gpus > 0 and gpu_memory_gib is None):
            raise ValueError("--gpus and --gpu-memory go together (GPUs per node, and GiB each)")
        if gpus == 0:
            return Cluster.cpu(cpu_memory_gib or host_memory_gib(), nodes or 1, "given")
        return Cluster.gpus(nodes or 1, gpus, gpu_memory_gib, "given")
    if cpu_memory_gib is not None:
        return Cluster.cpu(cpu_memory_gib, nodes or 1, "given")
    if os.environ.get("RAY_ADDRESS"):
        return _ray_cluster(nodes)
    return _this_machine(nodes)


def _this_machine(nodes: int | None) -> Cluster:
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count():
        memory = torch.cuda.get_device_properties(0).total_memory / GIB
        return Cluster.gpus(nodes or 1, torch.cuda.device_count(), memory,
                            f"this machine: {torch.cuda.get_device_name(0)}")
    return Cluster.cpu(host_memory_gib(), nodes or 1, "this machine's RAM")


def _ray_cluster(nodes: int | None) -> Cluster:
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=os.environ["RAY_ADDRESS"], include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        gpu_counts = [int(n.get("Resources", {}).get("GPU", 0)) for n in alive]
        memory = [n.get("Resources", {}).get("memory", 0) / GIB for n in alive]
    finally:
        if started_here:
            ray.shutdown()
    gpu_nodes = [g for g in gpu_counts if g]
    where = f"Ray at {os.environ['RAY_ADDRESS']}"
    if not gpu_nodes:
        return Cluster.cpu(min(memory) if memory else host_memory_gib(), nodes or max(1, len(alive)), where)
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"{where} reports {sum(gpu_nodes)} GPUs but not their memory: give --gpus N --gpu-memory GiB")
    return Cluster.gpus(nodes or len(gpu_nodes), min(gpu_nodes),
                        torch.cuda.get_device_properties(0).total_memory / GIB, where)


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Process:
    """One process (trainer rank, engine rank) and the device it uses; ``device`` is ``node:gpu`` or ``host``."""

    label: str
    estimate: Estimate
    device: str
    sleeps_during_updates: bool = False  # an engine that shares its process (and GPU) with trainer rank 0

    def bytes_on_device(self, cpu_only: bool) -> int:
        gpu = self.estimate.peak(GPU)
        return gpu + self.estimate.peak(HOST) if cpu_only or self.device.startswith("host") else gpu


@dataclass
class Device:
    name: str  # "node 0 GPU 3" or "node 0 host memory"
    capacity: float | None  # bytes; None: not checked
    processes: list[Process] = field(default_factory=list)
    cpu_only: bool = False
    node: int = 0
    gpu: int | None = None  # None: host memory
    missing: bool = False  # a GPU beyond the cluster's (the stage needs more than there are)

    @property
    def used(self) -> int:
        runtime = int(RUNTIME_GIB * GIB)
        engine = next((p for p in self.processes if p.sleeps_during_updates), None)
        trainer = next((p for p in self.processes if p.label == "trainer rank 0"), None)
        if engine is None or trainer is None or self.cpu_only:
            return sum(p.bytes_on_device(self.cpu_only) + runtime for p in self.processes)
        # one process, in turns: the engine asleep (nothing kept) during the update, the trainer's resident state
        # kept while the engine generates
        generating = trainer.estimate.phase_bytes(RESIDENT, GPU) + engine.bytes_on_device(False)
        shared = max(trainer.bytes_on_device(False), generating) + runtime
        return shared + sum(p.bytes_on_device(self.cpu_only) + runtime for p in self.processes
                            if p is not engine and p is not trainer)

    @property
    def shortfall(self) -> int:
        return 0 if self.capacity is None else max(0, self.used - int(self.capacity))


@dataclass
class StagePlan:
    """One stage (kind, the arms it stands for): its processes on their devices, and what does not fit."""

    kind: str
    arms: list[str]
    devices: list[Device]
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # besides memory: GPUs short, vLLM's minimum KV cache
    suggestions: list[str] = field(default_factory=list)
    signature: str = ""

    @property
    def name(self) -> str:
        return f"{self.kind} ({', '.join(self.arms)})" if self.kind != "eval" else "eval"

    @property
    def fits(self) -> bool:
        return not self.problems and all(d.shortfall == 0 for d in self.devices)

    def refusal(self) -> str:
        lines = list(self.problems)
        for d in self.devices:
            if d.shortfall:
                lines.append(f"{self.name} stage: {d.name} needs {d.used / GIB:.1f} GiB, has {d.capacity / GIB:.1f} GiB:"
                             f" {d.shortfall / GIB:.1f} GiB short ({', '.join(p.label for p in d.processes)})")
        return "\n".join(lines)

    def format(self) -> str:
        lines = [f"== {self.name}: {'fits' if self.fits else 'DOES NOT FIT'}"]
        lines += [f"   {n}" for n in self.notes]
        shown: dict[str, str] = {}
        for group in _runs([d for d in self.devices if d.processes]):
            d = group[0]
            cap = "not checked" if d.capacity is None else f"of {d.capacity / GIB:.1f} GiB"
            state = f"{d.shortfall / GIB:.1f} GiB SHORT" if d.shortfall else "ok"
            name = d.name if len(group) == 1 else f"node {d.node} GPUs {d.gpu}-{group[-1].gpu}" + (
                " (not in the cluster)" if d.missing else "") + ", each"
            what = " + ".join(p.label for p in d.processes) if len(group) == 1 else \
                f"{d.processes[0].label.rsplit(' ', 1)[0]}s {d.processes[0].label.rsplit(' ', 1)[1]}-" \
                f"{group[-1].processes[0].label.rsplit(' ', 1)[1]}, one per GPU"
            lines.append(f" {name}: {d.used / GIB:.2f} GiB {cap} ({state}); {what}"
                         f" + runtime {RUNTIME_GIB:g} GiB per process")
        for d in self.devices:
            for p in d.processes:
                key = p.estimate.format()
                if key in shown:
                    continue
                shown[key] = p.label
                lines.append("   " + key.replace("\n", "\n   "))
        lines += [f" ! {p}" for p in self.problems]
        for d in self.devices:
            if d.shortfall:
                lines.append(f" ! {d.name}: {d.shortfall / GIB:.1f} GiB short")
        if self.suggestions:
            lines.append(" settings that fit (nearest first):")
            lines += [f"   {s}" for s in self.suggestions]
        return "\n".join(lines)


def _runs(devices: list[Device]) -> list[list[Device]]:
    """Consecutive GPUs of one node that each hold one process of the same estimate (a trainer's ranks), grouped."""
    out: list[list[Device]] = []
    for d in devices:
        prev = out[-1][-1] if out else None
        same = (prev is not None and len(d.processes) == len(prev.processes) == 1 and d.gpu is not None
                and prev.gpu is not None and d.node == prev.node and d.missing == prev.missing
                and d.processes[0].estimate == prev.processes[0].estimate and d.used == prev.used
                and d.processes[0].label.rsplit(" ", 1)[0] == prev.processes[0].label.rsplit(" ", 1)[0]
                and d.processes[0].label.rsplit(" ", 1)[1].isdigit())
        if same:
            out[-1].append(d)
        else:
            out.append([d])
    return out


@dataclass
class MemoryPlan:
    cluster: Cluster
    stages: list[StagePlan]
    model: str
    precision: dict[str, str]

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def refusal(self) -> str:
        """What does not fit: each failing stage, its GPU and the shortfall, and the nearest settings that fit."""
        out = []
        for s in self.stages:
            if not s.fits:
                out.append(s.refusal())
                if s.suggestions:
                    out.append("  nearest settings that fit: " + "; or ".join(s.suggestions[:3]))
                else:
                    out.append("  no nearby setting fits (more GPUs, more memory per GPU, or a smaller model)")
        return "\n".join(out)

    def format(self) -> str:
        head = [f"plan for {self.cluster.describe()}", f"model {self.model}; precision: "
                + ", ".join(f"{k} {v}" for k, v in self.precision.items()),
                "per stage, each alone on the cluster (arms run concurrently only where the driver finds room)"]
        body = [s.format() for s in self.stages]
        tail = ["everything fits" if self.fits else "DOES NOT FIT:\n" + self.refusal()]
        return "\n".join(head) + "\n\n" + "\n\n".join(body) + "\n\n" + "\n".join(tail)


def _precision(recipe, cluster: Cluster) -> tuple[Any, dict[str, str]]:
    from rl.common.precision import Hardware, detect_hardware, resolve_bf16, resolve_dtype

    if cluster.has_gpus:
        hw = Hardware("cuda", "sm_80+", "planned GPU", True, "assumed: a GPU of this size computes bf16 natively")
    else:
        hw = detect_hardware("cpu")
    return hw, {"sft": resolve_bf16(recipe.sft.bf16, hardware=hw).dtype,
                "rl": resolve_bf16(recipe.rl.bf16, hardware=hw).dtype,
                "rollout": resolve_dtype(recipe.rollout.dtype, hardware=hw).dtype}


class _Slots:
    """Hands out GPUs in order, node by node (Ray's PACK for one placement group; an engine's TP GPUs on one node).
    Past the cluster's last GPU it goes on counting onto missing nodes, so that a stage needing more GPUs than
    there are is still itemised (and refused for the count)."""

    def __init__(self, cluster: Cluster):
        self.cluster, self.node, self.gpu = cluster, 0, 0

    def take(self, n: int, one_node: bool = False) -> list[tuple[int, int]]:
        per = self.cluster.gpus_per_node
        if one_node and self.gpu + n > per and 0 < self.gpu and self.node + 1 < self.cluster.nodes:
            self.node, self.gpu = self.node + 1, 0
        out = []
        for _ in range(n):
            if self.gpu >= per and self.node + 1 < self.cluster.nodes:
                self.node, self.gpu = self.node + 1, 0
            out.append((self.node, self.gpu))
            self.gpu += 1
        return out


def _trainer_setup(recipe, kind: str, arm, precision: dict[str, str], shape: ModelShape, device_kind: str,
                   prompt_tokens: int = PROMPT_TOKENS) -> tuple[TrainerSetup, MicroBatchShape, int, str]:
    """(setup, micro-batch, workers, what the numbers assume) of the trainer of an sft or rl stage of ``arm``;
    ``device_kind`` (cuda or cpu) resolves ``packing: auto`` as the stage would."""
    from rl.common.packing import MAX_PACKED_LENGTH, resolve_packing, sft_packed

    if kind == "sft":
        from eksft.objectives import get_objective

        cfg = recipe.sft
        needs = get_objective(arm.objective.name).needs_reference
        wants = needs or cfg.kl_metric_every > 0
        lora = LoraShape.from_settings(cfg.lora) if cfg.lora.enabled else None
        reference = "none" if not wants else cfg.reference
        setup = TrainerSetup(workers=cfg.workers, bf16=precision["sft"] == "bfloat16", weight_dtype=recipe.model.dtype,
                             lora=lora, reference=reference, activation_checkpointing=cfg.gradient_checkpointing,
                             unsharded_accumulation=cfg.workers == 1)
        padded = MicroBatchShape(cfg.batch_size, recipe.data.max_length, reference_logits=wants)
        assumes = f"sft.batch_size {cfg.batch_size} x data.max_length {recipe.data.max_length}"
        if not sft_packed(cfg.packing, device_kind) or cfg.batch_size == 1:
            return setup, padded, cfg.workers, assumes
        # One packed row of at most B x T positions, every position with logits (no common prefix: the worst case)
        length = cfg.batch_size * recipe.data.max_length
        packed = MicroBatchShape(1, min(length, MAX_PACKED_LENGTH), padded=True, reference_logits=wants)
        batch = _worse(shape, setup, packed, padded if length > MAX_PACKED_LENGTH else None)
        return setup, batch, cfg.workers, assumes + f", packed (sft.packing {cfg.packing}): " + _describe(batch)
    rl = recipe.arm_rl(arm)
    lora = LoraShape.from_settings(rl.lora) if rl.lora.enabled else None
    # The KL metric is always measured (to the recipe's model): a frozen copy, except LoRA GRPO from the base model
    # itself, whose reference is the base with the adapters off.
    reference = "adapter" if lora is not None and arm.objective is None else "copy"
    setup = TrainerSetup(workers=rl.workers, bf16=precision["rl"] == "bfloat16", weight_dtype="float32", lora=lora,
                         lora_base_dtype=rl.lora.base_dtype if lora else None, reference=reference,
                         activation_checkpointing=rl.activation_checkpointing, cpu_offload=rl.cpu_offload,
                         unsharded_accumulation=rl.workers == 1)
    batch, assumes = rl_micro_batch(shape, setup, rl, prompt_tokens, resolve_packing(rl.packing, device_kind))
    return setup, batch, rl.workers, assumes


def rl_micro_batch(shape: ModelShape, setup: TrainerSetup, rl, prompt_tokens: int,
                   packing: str) -> tuple[MicroBatchShape, str]:
    """The largest GRPO micro-batch the trainer runs (as `rl.grpo.trainer.GRPOTrainer._micro_batch_chunks` cuts
    them), with every completion at ``rl.max_new_tokens``, and what it assumes.

    ``off``: ``micro_batch_size`` rows of p + m tokens, the LM head on the last m + 1. Packed (`rl.common.packing`),
    one row with a mask (``shared_prompt`` passes its own; for ``padding_free`` transformers builds one from the
    position ids): a unit is a group, p - 1 + G m positions (``padding_free``: a sequence, p - 1 + m), of which
    G m (m) carry logits; a micro-batch holds ceil(micro_batch_size / unit size) units, or with
    ``micro_batch_tokens`` T as many as T positions hold (a longer unit alone), at most max(T, one unit) positions
    of which all but one prompt carry logits. A row over `MAX_PACKED_LENGTH` runs padded: its sequences as
    rows of p + m, when that is the larger."""
    from rl.common.packing import MAX_PACKED_LENGTH

    p, m, G = prompt_tokens, rl.max_new_tokens, rl.group_size
    base = f"{p} prompt tokens assumed, rl.max_new_tokens {m}"
    if packing == "off":
        return (MicroBatchShape(rl.micro_batch_size, p + m, m + 1),
                f"rl.micro_batch_size {rl.micro_batch_size} x ({base.replace(', rl.', ' + rl.')})")
    unit_size = G if packing == "shared_prompt" else 1
    unit_length, unit_labels = p - 1 + unit_size * m, unit_size * m
    if rl.micro_batch_tokens is None:
        units = -(-rl.micro_batch_size // unit_size)
        length, labels = units * unit_length, units * unit_labels
        how = f"{units} unit{'s' if units > 1 else ''} of {unit_size} sequence{'s' if unit_size > 1 else ''}"
    else:
        units = max(1, rl.micro_batch_tokens // unit_length)
        length = max(rl.micro_batch_tokens, unit_length)
        labels = length - (p - 1)
        how = f"rl.micro_batch_tokens {rl.micro_batch_tokens}"
    packed = MicroBatchShape(1, min(length, MAX_PACKED_LENGTH), min(labels, MAX_PACKED_LENGTH - (p - 1)),
                             padded=True)
    padded = MicroBatchShape(units * unit_size, p + m, m + 1) if length > MAX_PACKED_LENGTH else None
    batch = _worse(shape, setup, packed, padded)
    return batch, f"rl.packing {packing}, {how} ({base}): " + _describe(batch)


def _worse(shape: ModelShape, setup: TrainerSetup, batch: MicroBatchShape,
           other: MicroBatchShape | None) -> MicroBatchShape:
    """Of two micro-batches the trainer may run, the one with the larger peak (``other`` None: ``batch``)."""
    if other is None:
        return batch
    return max(batch, other, key=lambda b: trainer_estimate(shape, setup, b).peak())


def _describe(batch: MicroBatchShape) -> str:
    from rl.common.packing import MAX_PACKED_LENGTH

    if batch.sequences == 1 and batch.masked:
        return f"one packed row of {batch.length} positions, {batch.logit_tokens} with logits"
    return f"{batch.sequences} padded rows of {batch.length} tokens (the packed row would exceed {MAX_PACKED_LENGTH})"


def _engine(recipe, shape: ModelShape, kind: str, arm, dtype: str, on_gpu: bool, prompt_tokens: int) -> Estimate:
    ro = recipe.rollout
    tp = ro.tensor_parallel_size if on_gpu else 1
    block = GPU_BLOCK_SIZE if on_gpu else CPU_BLOCK_SIZE
    if kind == "rl":
        rl = recipe.arm_rl(arm)
        prompts, samples, new = math.ceil(rl.prompts_per_step / ro.num_engines), rl.group_size, rl.max_new_tokens
    else:
        ev = recipe.eval
        prompts, samples, new = math.ceil((ev.num_problems or 1) / ro.num_engines), ev.n, ev.max_new_tokens
    # vLLM's step budget (rl.rollout.vllm_engine.make_llm on CPU; vLLM's offline default on GPU)
    batched = max(ro.max_model_len, 16384)
    return engine_estimate(shape, dtype=dtype, tensor_parallel=tp, block_size=block, prompts=prompts, samples=samples,
                           prompt_len=prompt_tokens, max_new_tokens=new, max_model_len=ro.max_model_len,
                           kv_cache_gib=ro.kv_cache_gib, batched_tokens=batched)


def plan_stage(recipe, shape: ModelShape, cluster: Cluster, kind: str, arm, precision: dict[str, str],
               prompt_tokens: int = PROMPT_TOKENS) -> StagePlan:
    """Place one stage of ``kind`` for ``arm`` (None for the evaluations) on ``cluster``; see the module docstring."""
    res = getattr(recipe.resources, kind)
    ro = recipe.rollout
    stage = StagePlan(kind, [arm.name] if arm is not None else [], [])
    if kind in ("sft", "rl") and not cluster.has_gpus:
        stage.notes.append("CPU only: every process of the stage adds onto the node's host memory")
    cpu_only = not cluster.has_gpus
    devices: dict[str, Device] = {}

    def device(key: str) -> Device:
        if key not in devices:
            if key.startswith("host"):
                cap = cluster.host_memory_gib * GIB if cluster.host_memory_gib else None
                devices[key] = Device(f"node {key.split(':')[1]} host memory", cap, cpu_only=True)
            else:
                node, gpu = map(int, key.split(":"))
                missing = gpu >= cluster.gpus_per_node
                devices[key] = Device(f"node {node} GPU {gpu}" + (" (not in the cluster)" if missing else ""),
                                      cluster.gpu_memory_gib * GIB, node=node, gpu=gpu, missing=missing)
        return devices[key]

    slots = _Slots(cluster)
    own: list[tuple[int, int]] = []
    needed = 0
    if cluster.has_gpus and res.num_gpus > 0:
        needed += math.ceil(res.num_gpus)
        own = slots.take(math.ceil(res.num_gpus))
    own_key = f"{own[0][0]}:{own[0][1]}" if own else "host:0"

    if kind in ("sft", "rl"):
        setup, batch, workers, assumes = _trainer_setup(recipe, kind, arm, precision, shape,
                                                        "cuda" if cluster.has_gpus else "cpu", prompt_tokens)
        estimate = trainer_estimate(shape, setup, batch)
        stage.notes.append(f"trainer: {workers} rank{'s' if workers > 1 else ''}, micro-batch {assumes}")
        if workers == 1:
            stage.notes.append(f"trainer rank in the stage's process, on {device(own_key).name}")
            device(own_key).processes.append(Process("trainer rank 0", estimate, own_key))
        elif not cluster.has_gpus:
            for r in range(workers):
                device("host:0").processes.append(Process(f"trainer rank {r}", estimate, "host:0"))
        else:
            needed += workers
            got = slots.take(workers)
            for r, (node, gpu) in enumerate(got):
                device(f"{node}:{gpu}").processes.append(Process(f"trainer rank {r}", estimate, f"{node}:{gpu}"))
            nodes = sorted({n for n, _ in got})
            stage.notes.append(f"{workers} Ray trainer workers (PACK), one GPU each, on node"
                               f"{'s' if len(nodes) > 1 else ''} {', '.join(map(str, nodes))}")

    if kind in ("rl", "eval"):
        on_gpu_engines = cluster.has_gpus and (ro.in_ray_actors and ro.num_gpus > 0 or not ro.in_ray_actors and own)
        estimate = _engine(recipe, shape, kind, arm, precision["rollout"], bool(on_gpu_engines), prompt_tokens)
        if not ro.in_ray_actors:
            stage.notes.append(f"engine: one vLLM engine in the stage's process ({ro.placement}), on "
                               f"{device(own_key).name}")
            # on a GPU, an RL stage's in-process engine sleeps while the trainer of this process updates
            # (rl.rollout.from_config: trainer_shares_gpu)
            sleeps = kind == "rl" and bool(own) and cluster.has_gpus
            device(own_key).processes.append(Process("engine", estimate, own_key, sleeps_during_updates=sleeps))
        elif not on_gpu_engines:
            stage.notes.append(f"engines: {ro.num_engines} Ray actors on the CPU (rollout.num_gpus 0)")
            for e in range(ro.num_engines):
                device("host:0").processes.append(Process(f"engine {e}", estimate, "host:0"))
        else:
            per_engine = math.ceil(ro.num_gpus) * ro.tensor_parallel_size
            needed += ro.num_engines * per_engine
            if per_engine > cluster.gpus_per_node:
                stage.problems.append(f"{stage.name} stage: an engine takes {per_engine} GPUs (rollout.num_gpus x "
                                      f"tensor_parallel_size), more than a node has ({cluster.gpus_per_node}): "
                                      "tensor parallelism stays within a node")
            where = []
            for e in range(ro.num_engines):
                got = slots.take(per_engine, one_node=True)
                for r, (node, gpu) in enumerate(got):
                    label = f"engine {e}" + (f" TP rank {r}" if ro.tensor_parallel_size > 1 else "")
                    device(f"{node}:{gpu}").processes.append(Process(label, estimate, f"{node}:{gpu}"))
                where.append(f"engine {e}: node {got[0][0]} GPU{'s' if len(got) > 1 else ''} "
                             + ",".join(str(g) for _, g in got))
            stage.notes.append(f"engines: {ro.num_engines} Ray actors x {per_engine} GPU(s), TP "
                               f"{ro.tensor_parallel_size} ({'; '.join(where)})")
        least = kv_blocks(ro.max_model_len, GPU_BLOCK_SIZE if on_gpu_engines else CPU_BLOCK_SIZE)
        need_item = next(i for i in estimate.items if i.name.startswith("KV cache vLLM requires"))
        if ro.engine == "vllm" and ro.kv_cache_gib * GIB < need_item.bytes:
            stage.problems.append(f"{stage.name} stage: rollout.kv_cache_gib {ro.kv_cache_gib:g} holds less than one "
                                  f"rollout.max_model_len {ro.max_model_len} sequence ({least} blocks, "
                                  f"{need_item.bytes / GIB:.2f} GiB): vLLM refuses to start")

    if cluster.has_gpus and any(k.startswith("host") for k in devices):
        on_cpu = ", ".join(p.label for k in devices if k.startswith("host") for p in devices[k].processes)
        stage.problems.append(f"{stage.name} stage: {on_cpu} would run on the CPU of a GPU cluster (no GPU: "
                              f"resources.{kind}.num_gpus 0 for the stage's own process, or rollout.num_gpus 0)")
    if cluster.has_gpus and needed > cluster.total_gpus:
        stage.problems.append(f"{stage.name} stage needs {needed} GPUs (the stage's own "
                              f"{math.ceil(res.num_gpus) if res.num_gpus else 0}, trainer workers, engines), the "
                              f"cluster has {cluster.total_gpus} ({needed - cluster.total_gpus} short)")
    stage.devices = [devices[k] for k in sorted(devices, key=_device_order)]
    stage.signature = "\n".join(d.name + "|" + "|".join(p.label + p.estimate.format() for p in d.processes)
                                for d in stage.devices) + "|".join(p.replace(stage.name, kind) for p in stage.problems)
    return stage


def _device_order(key: str):
    node, gpu = key.split(":")
    return (key.startswith("host"), int(node) if node.isdigit() else 0, int(gpu))


def _stage_list(recipe) -> list[tuple[str, Any]]:
    out = [("sft", a) for a in recipe.arms if a.objective is not None]
    out += [("rl", a) for a in recipe.arms]
    return out + [("eval", None)]


def plan_memory(recipe, cluster: Cluster, *, model_config: str | Path | None = None, suggest: bool = True,
                shape: ModelShape | None = None, prompt_tokens: int = PROMPT_TOKENS) -> MemoryPlan:
    """Every stage of ``recipe`` placed on ``cluster``; arms whose stage comes out identical are merged. Stages
    that do not fit get ``suggestions``: the nearest settings (fewest changes) that fit, by re-planning.
    ``prompt_tokens``: the prompt length assumed for RL and evaluation (recipes do not bound it)."""
    shape = shape or model_shape(recipe.model.name, recipe.model.revision, model_config)
    _, precision = _precision(recipe, cluster)
    stages: list[StagePlan] = []
    for kind, arm in _stage_list(recipe):
        stage = plan_stage(recipe, shape, cluster, kind, arm, precision, prompt_tokens)
        same = next((s for s in stages if s.kind == kind and s.signature == stage.signature), None)
        if same is not None:
            old = same.name
            same.arms += stage.arms
            same.problems = [p.replace(old, same.name) for p in same.problems]
            continue
        if suggest and not stage.fits:
            stage.suggestions = _suggestions(recipe, shape, cluster, kind, arm, prompt_tokens)
        stages.append(stage)
    return MemoryPlan(cluster, stages, recipe.model.name, precision)


# --------------------------------------------------------------------------- suggestions


def _candidates(recipe, kind: str, arm, cluster: Cluster) -> list[list[str]]:
    """Single changes to try, each a list of ``--set`` overrides, in order of preference."""
    out: list[list[str]] = []
    gpus = cluster.total_gpus
    free = gpus - (math.ceil(getattr(recipe.resources, kind).num_gpus) if cluster.has_gpus else 0)
    if kind == "sft":
        cfg = recipe.sft
        if cluster.has_gpus and cfg.workers > max(1, free):
            w = max(1, free)
            out.append(_sft_workers(cfg, w) + (["resources.sft.num_gpus=1"]
                                                if w == 1 and not recipe.resources.sft.num_gpus else []))
        if not cfg.gradient_checkpointing:
            out.append(["sft.gradient_checkpointing=true"])
        if cluster.has_gpus:
            for w in sorted({w for w in (2, 4, 8, 16, 32, gpus) if cfg.workers < w <= gpus}):
                out.append(_sft_workers(cfg, w))
        if cfg.batch_size > 1:
            half = cfg.batch_size // 2
            out.append([f"sft.batch_size={half}", f"sft.grad_accum={cfg.grad_accum * cfg.batch_size // half}"]
                       if cfg.batch_size % half == 0 and not cfg.global_batch else [f"sft.batch_size={half}"])
        if not cfg.lora.enabled:
            out.append(["sft.lora.enabled=true", "sft.reference=adapter"])
        return out
    ro = recipe.rollout
    if kind == "rl":
        rl = recipe.arm_rl(arm)
        prefix = f"arms.{arm.name}.rl" if arm.rl else "rl"
        if cluster.has_gpus and rl.workers > max(1, free):
            w = max(1, free)
            out.append([f"{prefix}.workers={w}"] + (["resources.rl.num_gpus=1"]
                                                    if w == 1 and not recipe.resources.rl.num_gpus else []))
        if not rl.activation_checkpointing:
            out.append([f"{prefix}.activation_checkpointing=true"])
        if cluster.has_gpus:
            for w in sorted({w for w in (2, 4, 6, 7, 8, 16, gpus - 1, gpus - 2) if rl.workers < w <= gpus}):
                out.append([f"{prefix}.workers={w}"])
        m = rl.micro_batch_size
        while m > 1:
            m //= 2
            out.append([f"{prefix}.micro_batch_size={m}"])
        if not rl.lora.enabled:
            out.append([f"{prefix}.lora.enabled=true", f"{prefix}.lora.base_dtype=bfloat16"])
        if cluster.has_gpus and not rl.cpu_offload:
            out.append([f"{prefix}.cpu_offload=true"])
    if ro.num_engines > 1:
        out.append([f"rollout.num_engines={n}" for n in [ro.num_engines - 1]])
    if cluster.has_gpus:
        if not ro.in_ray_actors:
            out.append(["rollout.placement=separate", f"resources.{kind}.num_gpus=0", "rollout.num_gpus=1"])
        if ro.tensor_parallel_size == 1 and ro.num_gpus > 0:
            out.append(["rollout.tensor_parallel_size=2"])
    for frac in (0.5, 0.25):
        kv = round(ro.kv_cache_gib * frac, 2)
        if kv > 0:
            out.append([f"rollout.kv_cache_gib={kv:g}"])
    return out


def _sft_workers(cfg, w: int) -> list[str]:
    """``sft.workers=w``, keeping the global batch with grad_accum where it divides (else restating it)."""
    total = cfg.workers * cfg.grad_accum
    if total % w == 0:
        return [f"sft.workers={w}", f"sft.grad_accum={total // w}"]
    return [f"sft.workers={w}"] + ([f"sft.global_batch={w * cfg.batch_size * cfg.grad_accum}"] if cfg.global_batch
                                   else [])


def _suggestions(recipe, shape: ModelShape, cluster: Cluster, kind: str, arm, prompt_tokens: int = PROMPT_TOKENS,
                 limit: int = 3) -> list[str]:
    from eksft.config import RecipeError, apply_override, validate_recipe

    raw = recipe.model_dump(mode="json")
    candidates = _candidates(recipe, kind, arm, cluster)
    found: list[str] = []
    for size in (1, 2, 3):
        for combo in itertools.combinations(candidates, size):
            changes = [c for change in combo for c in change]
            keys = [c.split("=")[0] for c in changes]
            if len(set(keys)) != len(keys):
                continue
            trial = json.loads(json.dumps(raw))
            try:
                for c in changes:
                    apply_override(trial, c)
                changed = validate_recipe(trial, "<suggestion>")
                _, precision = _precision(changed, cluster)
                arm2 = next((a for a in changed.arms if a.name == arm.name), None) if arm is not None else None
                if plan_stage(changed, shape, cluster, kind, arm2, precision, prompt_tokens).fits:
                    found.append(" ".join(f"--set {c}" for c in changes))
            except (RecipeError, ValueError, StopIteration):
                continue
            if len(found) >= limit:
                return found
        if found:
            return found
    return found


def refusal_message(plan: MemoryPlan) -> str:
    return (f"the recipe does not fit {plan.cluster.describe()}:\n{plan.refusal()}\n"
            "(`eksft plan` prints the itemised estimate; `eksft run --force` runs anyway)")

