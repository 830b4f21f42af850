"""A loss as named (sum, count, weight) terms kept per sequence, so any batch can fix the normaliser.

Each term holds per-sequence token sums ``total[b]`` (with gradient) and token counts
``count[b]``. Two aggregations:

* ``token-mean``: ``weight * sum_b total[b] / sum_b count[b]`` - the formula of docs/method.md, EKSFT objective, for one
  micro-batch. Across micro-batches (gradient accumulation, data parallelism) it is exact only
  when every micro-batch divides by the counts summed over the whole batch: ``reduce(counts)``
  with ``LossParts.total_counts(...)``.
* ``seq-mean-token-mean`` (default): ``weight * mean_b total[b] / count[b]`` (a sequence with an
  empty set contributes 0). Each sequence's loss is the paper's formula over its own tokens, and
  the batch loss is a mean over sequences, so its normaliser (the number of sequences) is known
  before the forward: k micro-batches of 1 give exactly the update of one batch of k. With
  batch size 1, the authors' setting, both aggregations are the same number.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Count = Tensor | int | float
Aggregation = Literal["seq-mean-token-mean", "token-mean"]


@dataclass(frozen=True)
class LossTerm:
    """``weight * total / count`` aggregated over sequences; ``total`` and ``count`` are [B] (or 0-dim)."""

    total: Tensor
    count: Tensor
    weight: float = 1.0

    def value(self, count: Count | None = None, aggregation: Aggregation = "token-mean") -> Tensor:
        """The aggregated term; ``count`` overrides the token-mean denominator (a global count)."""
        if aggregation == "seq-mean-token-mean":
            if count is not None:
                raise ValueError("global counts apply to token-mean only; seq-mean-token-mean needs none")
            per_seq = self.total / self.count.to(self.total.dtype).clamp(min=1)
            return self.weight * per_seq.mean()
        denom = torch.as_tensor(self.count.sum() if count is None else count, device=self.total.device)
        return self.weight * self.total.sum() / denom.to(self.total.dtype).clamp(min=1)


@dataclass
class LossParts:
    """An objective's loss terms (summed in ``reduce``) and its detached metrics.

    ``metrics["loss"]`` is always the loss as ``reduce()`` gives it.
    """

    terms: dict[str, LossTerm]
    metrics: dict[str, Tensor] = field(default_factory=dict)
    aggregation: Aggregation = "seq-mean-token-mean"

    def __post_init__(self) -> None:
        self.metrics["loss"] = self.reduce().detach().to(torch.float32)

    def counts(self) -> dict[str, Tensor]:
        """Token count of each term: sum these over micro-batches / ranks for ``reduce``."""
        return {name: term.count.sum() for name, term in self.terms.items()}

    def reduce(self, counts: Mapping[str, Count] | None = None) -> Tensor:
        """The loss; with token-mean, ``counts[name]`` (e.g. over a whole accumulated batch) replaces local counts."""
        values = [
            term.value(None if counts is None else counts[name], self.aggregation)
            for name, term in self.terms.items()
        ]
        return functools.reduce(operator.add, values)

    @staticmethod
    def total_counts(parts: Iterable[LossParts]) -> dict[str, Tensor]:
        """Per-term counts summed over several micro-batches (all-reduce them across ranks too)."""
        totals: dict[str, Tensor] = {}
        for part in parts:
            for name, count in part.counts().items():
                totals[name] = totals[name] + count if name in totals else count
        return totals
