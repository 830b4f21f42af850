"""What the cold start trains at each optimizer step, and at which learning rate: pure functions, no model.

The data order and the step arithmetic are the HF Trainer's (transformers 5 with accelerate), so a recipe trains
on the same examples in the same order as the Trainer-based cold start did (tests/test_sft_loop.py checks it
against the Trainer itself):

* epoch ``e`` visits the examples in the order ``torch.randperm(n)`` drawn from a generator seeded ``seed + e``
  (accelerate's seedable sampler with ``data_seed = seed``);
* micro-batches are consecutive runs of ``batch_size`` examples of that order (the last one may be shorter);
* a step takes ``workers x grad_accum`` micro-batches; the last step of an epoch takes what is left;
* without ``max_steps`` the run has ``ceil(epochs x steps_per_epoch)`` steps;
* the learning rate of step ``s`` (0-based) follows ``transformers.get_scheduler`` with
  ``ceil(warmup_ratio x total_steps)`` warmup steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """Warmup steps for a ratio in [0, 1) of the run: ``ceil(total x ratio)`` (HF's ``warmup_steps`` < 1)."""
    return math.ceil(total_steps * warmup_ratio)


def learning_rate_at(step: int, *, base: float, schedule: str, warmup: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): a linear warmup from 0 over ``warmup`` steps, then
    ``constant``, ``linear`` decay to 0 at ``total``, or half a ``cosine`` to 0 at ``total``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr_scheduler {schedule!r} (allowed: {', '.join(SCHEDULES)})")
    if schedule == "constant":
        return base
    if step < warmup:
        return base * step / max(1, warmup)
    if schedule == "constant_with_warmup":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base * max(0.0, 1.0 - progress)
    return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The example indices of epoch ``epoch``, in training order."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return tuple(torch.randperm(n, generator=generator).tolist())


@dataclass(frozen=True)
class StepPlan:
    """The examples of every optimizer step of a cold start."""

    num_examples: int
    batch_size: int
    grad_accum: int
    workers: int
    seed: int
    epochs: float
    max_steps: int | None = None

    def __post_init__(self):
        if self.num_examples < 1:
            raise ValueError("the cold start needs at least one example")

    @property
    def micro_batches_per_step(self) -> int:
        return self.workers * self.grad_accum

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return max(math.ceil(self.micro_batches_per_epoch / self.micro_batches_per_step), 1)

    @property
    def total_steps(self) -> int:
        return self.max_steps or math.ceil(self.epochs * self.steps_per_epoch)

    def micro_batches(self, step: int) -> list[list[int]]:
        """The example indices of each micro-batch of optimizer step ``step`` (0-based), in order."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.num_examples, self.seed, epoch)
        first = k * self.micro_batches_per_step
        last = min(first + self.micro_batches_per_step, self.micro_batches_per_epoch)
        return [list(order[j * self.batch_size:(j + 1) * self.batch_size]) for j in range(first, last)]

    def epoch_after(self, step: int) -> float:
        """The epoch count reached at the end of step ``step``: whole epochs + the share of micro-batches done."""
        epoch, k = divmod(step, self.steps_per_epoch)
        done = min((k + 1) * self.micro_batches_per_step, self.micro_batches_per_epoch)
        return epoch + done / self.micro_batches_per_epoch
