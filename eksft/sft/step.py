"""The cold start's loss as the trainer workers run it: one micro-batch of tokenized examples, the policy forward,
the reference forward when the objective (or the KL metric) wants it, the registered objective.

`ObjectiveStepLoss` is an `rl.workers.batch.StepLoss`: it travels to every rank with each step. Normalisation:
the step's loss is the mean of the micro-batch losses weighted by their sequences,

    loss = sum_m (n_m / N) * objective_loss(micro-batch m),      N = sequences of the step over all ranks,

so with the default ``seq-mean-token-mean`` aggregation it is exactly the mean over every sequence of the step,
whatever the number of workers and the accumulation; with ``token-mean`` each micro-batch is normalised by its own
token counts (EKSFT's kept-token counts are known only after the forward), which for equal micro-batches is what
the HF Trainer did (each micro-batch's loss / accumulation steps, averaged over processes). Metrics are weighted
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eksft.objectives import IGNORE_INDEX, ObjectiveConfig, get_objective
from eksft.sft.forward import causal_lm_logits, pad_collate
from rl.common.token_stats import takes_logits_to_keep


@dataclass
class SFTMicroBatch:
    """Tokenized examples (``input_ids`` and ``labels`` with -100 outside the trained span), as plain lists."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    padding: bool = False  # a rank's filler (`ObjectiveStepLoss.padding`): trains nothing, weighs nothing

    def __len__(self) -> int:
        return len(self.input_ids)

    @classmethod
    def of(cls, examples: list[dict]) -> SFTMicroBatch:
        return cls([list(e["input_ids"]) for e in examples], [list(e["labels"]) for e in examples])


@dataclass
class ObjectiveStepLoss:
    """The objective of one cold-start step on a worker (see the module docstring for the normalisation).

    ``with_reference``: run the reference forward (the objective needs it, or this is a KL-metric step).
    ``packed``: run each micro-batch as one packed row without padding, the positions every sequence shares (the
    system prompt) computed once (`eksft.sft.forward.causal_lm_logits`: still one forward per micro-batch, as FSDP
    needs on every rank); ``sft.packing``.
    """

    objective: ObjectiveConfig
    pad_token_id: int
    with_reference: bool
    packed: bool = True
    metric_names: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if not self.metric_names:
            self.metric_names = objective_metric_names(self.objective, self.with_reference)

    def weights(self, micro_batches: list[SFTMicroBatch]) -> list[float]:
        return [float(sum(len(mb) for mb in micro_batches if not mb.padding))]

    def padding(self, like: SFTMicroBatch) -> SFTMicroBatch:
        """One two-token sequence with nothing to train: the same forwards, zero loss, zero weight."""
        return SFTMicroBatch([[self.pad_token_id] * 2], [[IGNORE_INDEX] * 2], padding=True)

    def __call__(self, worker, mb: SFTMicroBatch, totals: list[float]):
        (sequences,) = totals
        weight = 0.0 if mb.padding else float(len(mb))
        batch = pad_collate(self.pad_token_id)([{"input_ids": i, "labels": lab} for i, lab in zip(mb.input_ids, mb.labels)])
        ids, attention, labels = (batch[k].to(worker.device) for k in ("input_ids", "attention_mask", "labels"))
        first = first_predicting_position(worker.model, labels)
        ref_logits = None
        if self.with_reference:
            with worker.reference_model() as reference:
                ref_logits = causal_lm_logits(reference, ids, attention, first, packed=self.packed)[:, :-1]
        logits = causal_lm_logits(worker.model, ids, attention, first, packed=self.packed)
        # logits[:, t] predicts token t+1: shift once here, the objectives take aligned tensors.
        parts = get_objective(self.objective.name).parts(logits[:, :-1], labels[:, first + 1:], ref_logits,
                                                         self.objective)
        loss = parts.reduce() * (weight / max(sequences, 1.0))
        metrics = {("objective_loss" if k == "loss" else k): float(v) * weight for k, v in parts.metrics.items()}
        return loss, metrics, weight


def first_predicting_position(model, labels: torch.Tensor) -> int:
    """The first position whose logits predict a label of this micro-batch (0: keep every position)."""
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if labelled.numel() == 0 or not takes_logits_to_keep(model):
        return 0
    return max(0, min(int(labelled[0]) - 1, labels.shape[1] - 2))  # at least two positions stay


def objective_metric_names(objective: ObjectiveConfig, with_reference: bool) -> tuple[str, ...]:
    """The metric names the objective reports (with or without reference logits), from a tiny forward-free call:
    every rank must all-reduce the same names."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 5, generator=generator)
    ref = torch.randn(1, 3, 5, generator=generator) if with_reference else None
    labels = torch.tensor([[1, 2, 3]])
    parts = get_objective(objective.name).parts(logits, labels, ref, objective)
    return tuple(sorted("objective_loss" if k == "loss" else k for k in parts.metrics))
