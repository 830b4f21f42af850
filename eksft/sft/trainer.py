"""The cold-start trainer: transformers' Trainer with a token-level objective and a frozen reference.

What the Trainer already gives (and we keep): gradient accumulation, bf16 autocast, gradient
checkpointing, data parallel under torchrun (tested: 2 processes = 2 accumulation steps), FSDP/DeepSpeed
through accelerate (untested here), checkpoint + resume, TensorBoard/W&B.
What this adds:
  * ``compute_loss`` runs the policy forward once, the reference forward (no grad) when the
    objective needs it, and the registered objective on the shifted logits;
  * per-step objective metrics, averaged over the step's micro-batches, merged into the
    Trainer's logs and appended to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from eksft.objectives import IGNORE_INDEX, ObjectiveConfig, get_objective
from rl.lora import adapters_disabled


class ReferenceModel:
    """The frozen model the SFT started from: a separate copy, or the LoRA base with adapters disabled."""

    def __init__(self, mode: str, copy: torch.nn.Module | None = None):
        if mode == "copy" and copy is None:
            raise ValueError("reference mode 'copy' needs the frozen model")
        self.mode, self.copy = mode, copy
        if copy is not None:
            copy.eval().requires_grad_(False)

    @torch.no_grad()
    def logits(self, policy: torch.nn.Module, input_ids, attention_mask) -> torch.Tensor:
        if self.mode == "copy":
            return self.copy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        unwrapped = policy.module if hasattr(policy, "module") else policy
        with adapters_disabled(unwrapped) as base:  # eval mode inside: no LoRA dropout noise in the reference
            return base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class SelectiveSFTTrainer(Trainer):
    def __init__(self, *args, objective: ObjectiveConfig, reference: ReferenceModel | None,
                 kl_metric_every: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective_config = objective
        self.objective = get_objective(objective.name)
        if self.objective.needs_reference and reference is None:
            raise ValueError(f"objective {objective.name!r} needs a reference model")
        self.reference = reference
        if reference is not None and reference.copy is not None:
            reference.copy.to(self.args.device)
        self.kl_metric_every = kl_metric_every
        # Objectives return a micro-batch mean (over sequences by default): the Trainer divides by the
        # number of accumulation steps, which keeps the update independent of how a batch is split.
        self.loss_is_scaled_for_ga = False
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_counts: dict[str, int] = {}

    def _wants_reference(self) -> bool:
        if self.reference is None:
            return False
        if self.objective.needs_reference:
            return True
        every = self.kl_metric_every
        return every > 0 and self.state.global_step % every == 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids, attention_mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        ref_logits = None
        if self._wants_reference():
            ref_logits = self.reference.logits(model, input_ids, attention_mask)[:, :-1]
        # logits[:, t] predicts token t+1: shift once here, the objectives take aligned tensors.
        logits, shifted_labels = outputs.logits[:, :-1], labels[:, 1:]
        parts = self.objective.parts(logits, shifted_labels, ref_logits, self.objective_config)
        loss = parts.reduce()
        self._accumulate(parts.metrics)
        return (loss, outputs) if return_outputs else loss

    def _accumulate(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            value = value.detach().float()
            self._metric_sums[name] = self._metric_sums.get(name, 0) + value
            self._metric_counts[name] = self._metric_counts.get(name, 0) + 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # Training logs carry "loss"; attach the objective metrics averaged since the last log.
        if "loss" in logs and self._metric_sums:
            names = sorted(self._metric_sums)
            means = torch.stack([torch.as_tensor(self._metric_sums[n]).double() / self._metric_counts[n] for n in names])
            if self.accelerator.num_processes > 1:
                # Every process logs at the same step (like the Trainer's own loss): mean over processes,
                # which for the default seq-mean aggregation is the mean over all their sequences.
                means = self.accelerator.reduce(means, reduction="mean")
            for name, value in zip(names, means.tolist()):
                logs[name if name != "loss" else "objective_loss"] = round(value, 6)
            self._metric_sums.clear()
            self._metric_counts.clear()
        super().log(logs, *args, **kwargs)


class MetricsJsonlCallback(TrainerCallback):
    """Append every training log (step, loss, lr, grad norm, objective metrics) to metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        record = {"phase": "sft", "step": state.global_step, "epoch": state.epoch}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def pad_collate(pad_token_id: int):
    """Right-pad input_ids (pad id), labels (-100) and build the attention mask."""

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(examples), length), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            attention[i, :n] = 1
        return {"input_ids": ids, "attention_mask": attention, "labels": labels}

    return collate
