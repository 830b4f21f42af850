"""The previous cold-start trainer, kept as the baseline the new loop is checked and measured against.

This is the HF-Trainer path that `eksft.sft.run` replaced (transformers' Trainer with a token-level objective and a
frozen reference, the policy's shared-prefix forward through a KV cache; the reference, the collator and the
prefix length are today's, from `eksft.sft.forward`): `hf_train` runs it on a recipe's data, writing
metrics.jsonl as it did. tests/test_sft_loop.py compares the new loop's first steps (losses, learning rates, data
order) with it, and benchmarks/sft_step.py (``--loops``) times the two. Not part of the product: nothing in
eksft/ or rl/ imports it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from eksft.objectives import IGNORE_INDEX, ObjectiveConfig, get_objective
from eksft.sft.forward import ReferenceModel, common_prefix_length, pad_collate
from rl.common.token_stats import takes_logits_to_keep


def causal_lm_logits(model, input_ids, attention_mask, first: int, *, share_prefix: bool = True) -> torch.Tensor:
    """Logits of positions ``first`` .. T-1 ([B, T - first, V]) of a right-padded batch.

    * The LM head runs only on those positions (``logits_to_keep``), where the labels are predicted.
    * With ``share_prefix``, the positions every sequence has in common before ``first`` (the chat template's
      system prompt: ~30 of the quickstart's ~70 tokens) are computed once, and the rest of each sequence
      runs on their keys and values as KV cache. Causal attention makes this the same computation; the
      gradients of the shared prefix are the sums over the batch (tested against the plain forward).
      Not under gradient checkpointing or DistributedDataParallel (one forward per step there).
    """
    batch, width = input_ids.shape
    keep = {"logits_to_keep": width - first} if first > 0 else {}
    shared = min(common_prefix_length(input_ids, attention_mask), first) if share_prefix and batch > 1 else 0
    if shared < 2:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **keep).logits
    from transformers import DynamicCache

    prefix = model(input_ids=input_ids[:1, :shared], use_cache=True, logits_to_keep=1)
    cache = DynamicCache(ddp_cache_data=[(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:]))
                                         for k, v, *_ in prefix.past_key_values], config=model.config)
    positions = torch.arange(shared, width, device=input_ids.device).expand(batch, -1)
    return model(input_ids=input_ids[:, shared:], attention_mask=attention_mask, position_ids=positions,
                 past_key_values=cache, use_cache=True, **keep).logits


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
        self._keeps_logits: bool | None = None  # whether the model takes logits_to_keep (checked once)
        # The shared prefix needs a second forward with a KV cache: not with recomputed activations, nor
        # under DistributedDataParallel (whose gradient hooks expect one forward per backward).
        self._share_prefix = not self.args.gradient_checkpointing and self.args.world_size == 1
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
        first = self._first_predicting_position(model, labels)
        logits = causal_lm_logits(model, input_ids, attention_mask, first, share_prefix=self._share_prefix)
        ref_logits = None
        if self._wants_reference():
            ref_logits = self.reference.logits(model, input_ids, attention_mask, first)[:, :-1]
        # logits[:, t] predicts token t+1: shift once here, the objectives take aligned tensors.
        logits, shifted_labels = logits[:, :-1], labels[:, first + 1:]
        parts = self.objective.parts(logits, shifted_labels, ref_logits, self.objective_config)
        loss = parts.reduce()
        self._accumulate(parts.metrics)
        return (loss, {"logits": logits}) if return_outputs else loss

    def _first_predicting_position(self, model, labels: torch.Tensor) -> int:
        """The first position whose logits predict a label of this micro-batch (0: keep every position)."""
        if self._keeps_logits is None:
            self._keeps_logits = takes_logits_to_keep(model)
        labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
        if not self._keeps_logits or labelled.numel() == 0:
            return 0
        return max(0, min(int(labelled[0]) - 1, labels.shape[1] - 2))  # at least two positions stay

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


def hf_train(recipe, objective, output_dir: str | Path, *, callbacks=()) -> Trainer:
    """Train ``objective`` with the recipe's ``sft`` settings through the HF Trainer, in this process (one device),
    as the previous ``run_sft`` did: metrics.jsonl and Trainer checkpoints under ``output_dir``. Returns the
    trainer (its model is the trained one)."""
    from transformers import TrainingArguments

    from eksft.data import build_sft_dataset
    from eksft.models import load_model
    from rl.common.lora import wrap_with_lora
    from rl.common.precision import resolve_bf16, stage_device

    cfg, out = recipe.sft, Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    model, tokenizer = load_model(recipe.model.name, recipe.model.dtype, recipe.model.trust_remote_code, recipe.model.revision)
    examples, _ = build_sft_dataset(recipe, tokenizer)
    needs_reference = get_objective(objective.name).needs_reference or cfg.kl_metric_every > 0
    if cfg.lora.enabled:
        model = wrap_with_lora(model, cfg.lora)
    reference = None
    if needs_reference:
        if cfg.reference == "adapter":
            reference = ReferenceModel("adapter")
        else:
            frozen, _ = load_model(recipe.model.name, recipe.model.dtype, recipe.model.trust_remote_code, recipe.model.revision)
            reference = ReferenceModel("copy", frozen)
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        adam_beta1=cfg.adam_betas[0], adam_beta2=cfg.adam_betas[1], weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, bf16=resolve_bf16(cfg.bf16, stage_device()).bf16,
        use_cpu=not torch.cuda.is_available(), gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, report_to="none", seed=recipe.seed, data_seed=recipe.seed,
        remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True)
    trainer = SelectiveSFTTrainer(
        model=model, args=args, train_dataset=examples, data_collator=pad_collate(tokenizer.pad_token_id),
        objective=objective, reference=reference,
        kl_metric_every=0 if get_objective(objective.name).needs_reference else cfg.kl_metric_every,
        callbacks=[MetricsJsonlCallback(out / "metrics.jsonl"), *callbacks])
    trainer.train()
    return trainer
