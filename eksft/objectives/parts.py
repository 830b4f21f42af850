"""A loss as named (sum, count, weight) terms, so any batch can fix the normaliser.

With gradient accumulation, or data-parallel ranks, a per-micro-batch token-mean weights
micro-batches with few kept tokens too much. Each term therefore carries its token sum
and token count; `reduce(counts)` divides by counts summed over the whole accumulated
batch, so that the per-micro-batch losses add up to the full-batch loss.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

Count = Tensor | int | float


@dataclass(frozen=True)
class LossTerm:
    """`weight * total / count`; `total` carries the gradient, `count` is a token count."""

    total: Tensor
    count: Tensor
    weight: float = 1.0

    def value(self, count: Count | None = None) -> Tensor:
        """The term normalised by `count` (default: its own); an empty term is 0."""
        denom = torch.as_tensor(self.count if count is None else count, device=self.total.device)
        return self.weight * self.total / denom.to(self.total.dtype).clamp(min=1)


@dataclass
class LossParts:
    """An objective's loss terms (summed in `reduce`) and its detached metrics.

    `metrics["loss"]` is always the locally normalised loss.
    """

    terms: dict[str, LossTerm]
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics["loss"] = self.reduce().detach().to(torch.float32)

    def counts(self) -> dict[str, Tensor]:
        """Token count of each term: sum these over micro-batches / ranks for `reduce`."""
        return {name: term.count for name, term in self.terms.items()}

    def reduce(self, counts: Mapping[str, Count] | None = None) -> Tensor:
        """The loss with each term divided by `counts[name]`, or by its local count if None."""
        values = [term.value(None if counts is None else counts[name]) for name, term in self.terms.items()]
        return functools.reduce(operator.add, values)

    @staticmethod
    def total_counts(parts: Iterable[LossParts]) -> dict[str, Tensor]:
        """Per-term counts summed over several micro-batches (all-reduce them across ranks too)."""
        totals: dict[str, Tensor] = {}
        for part in parts:
            for name, count in part.counts().items():
                totals[name] = totals[name] + count if name in totals else count
        return totals
