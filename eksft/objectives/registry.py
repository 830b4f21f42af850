"""The one registry of token-level objectives: a new objective is one file with `@register`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

from .config import ObjectiveConfig
from .parts import Count, LossParts

PartsFn = Callable[[Tensor, Tensor, Tensor | None, ObjectiveConfig], LossParts]


@dataclass(frozen=True)
class Objective:
    """A registered objective: `parts_fn(logits, labels, ref_logits, config) -> LossParts`."""

    name: str
    parts_fn: PartsFn
    needs_reference: bool

    def parts(
        self,
        logits: Tensor,
        labels: Tensor,
        ref_logits: Tensor | None = None,
        config: ObjectiveConfig | None = None,
    ) -> LossParts:
        """Loss terms as sums and counts (for normalising over an accumulated batch)."""
        if self.needs_reference and ref_logits is None:
            raise ValueError(f"objective {self.name!r} needs reference logits (ref_logits is None)")
        return self.parts_fn(logits, labels, ref_logits, config or ObjectiveConfig(name=self.name))

    def __call__(
        self,
        logits: Tensor,
        labels: Tensor,
        ref_logits: Tensor | None = None,
        config: ObjectiveConfig | None = None,
        counts: Mapping[str, Count] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """`(loss, metrics)`; the loss uses local counts unless global `counts` are given."""
        parts = self.parts(logits, labels, ref_logits, config)
        return parts.reduce(counts), parts.metrics


OBJECTIVES: dict[str, Objective] = {}


def register(name: str, needs_reference: bool) -> Callable[[PartsFn], PartsFn]:
    """Decorator adding a parts function to `OBJECTIVES` under `name`."""

    def add(parts_fn: PartsFn) -> PartsFn:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        OBJECTIVES[name] = Objective(name, parts_fn, needs_reference)
        return parts_fn

    return add


def get_objective(name: str) -> Objective:
    """The objective registered as `name`; the error lists the registered names."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise KeyError(f"unknown objective {name!r}; registered: {', '.join(sorted(OBJECTIVES))}") from None
