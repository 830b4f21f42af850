"""The one registry of token-level objectives: a new objective is one file with `@register`.

An objective registers its parts function with its settings class (whose ``name`` Literal is the
objective's name) and, if it masks tokens out of the cross-entropy, its selection function.
`catalog.py` imports the shipped objectives and builds the settings union from what registered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import Field
from torch import Tensor

from .parts import Count, LossParts
from .selection import TokenSelection, keep_every_token
from .settings import ObjectiveSettings

PartsFn = Callable[[Tensor, Tensor, Tensor | None, Any], LossParts]
SelectFn = Callable[[Tensor, Tensor, Tensor | None, Any], TokenSelection]


@dataclass(frozen=True)
class Objective:
    """A registered objective: `parts_fn(logits, labels, ref_logits, settings) -> LossParts`.

    ``select(logits, labels, ref_logits, settings)`` is the token selection its loss uses (for an objective
    that removes nothing, `keep_every_token`); `eksft inspect-masks` shows it.
    """

    name: str
    parts_fn: PartsFn
    needs_reference: bool
    settings: type[ObjectiveSettings]
    select: SelectFn = keep_every_token

    def parts(
        self,
        logits: Tensor,
        labels: Tensor,
        ref_logits: Tensor | None = None,
        config: ObjectiveSettings | None = None,
    ) -> LossParts:
        """Loss terms as sums and counts (for normalising over an accumulated batch)."""
        if self.needs_reference and ref_logits is None:
            raise ValueError(f"objective {self.name!r} needs reference logits (ref_logits is None)")
        config = self.settings() if config is None else config
        if not isinstance(config, self.settings):  # another objective's settings would be silently misread
            raise TypeError(f"objective {self.name!r} takes {self.settings.__name__}, got {type(config).__name__}")
        return self.parts_fn(logits, labels, ref_logits, config)

    def __call__(
        self,
        logits: Tensor,
        labels: Tensor,
        ref_logits: Tensor | None = None,
        config: ObjectiveSettings | None = None,
        counts: Mapping[str, Count] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """`(loss, metrics)`; the loss uses local counts unless global `counts` are given."""
        parts = self.parts(logits, labels, ref_logits, config)
        return parts.reduce(counts), parts.metrics


OBJECTIVES: dict[str, Objective] = {}


def register(
    settings: type[ObjectiveSettings], *, needs_reference: bool, select: SelectFn = keep_every_token
) -> Callable[[PartsFn], PartsFn]:
    """Decorator adding a parts function to `OBJECTIVES` under its settings' ``name``."""
    name = settings.model_fields["name"].default
    if not isinstance(name, str):
        raise TypeError(f"{settings.__name__}.name must default to the objective's name (a Literal of it)")

    def add(parts_fn: PartsFn) -> PartsFn:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        OBJECTIVES[name] = Objective(name, parts_fn, needs_reference, settings, select)
        return parts_fn

    return add


def get_objective(name: str) -> Objective:
    """The objective registered as `name`; the error lists the registered names."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise KeyError(f"unknown objective {name!r}; registered: {', '.join(objective_names())}") from None


def objective_names() -> list[str]:
    """The registered objectives' names, sorted (e.g. the CLI's ``--objective`` choices)."""
    return sorted(OBJECTIVES)


def settings_union() -> Any:
    """The settings of every registered objective as one pydantic type, told apart by ``name``."""
    return Annotated[Union[tuple(o.settings for o in OBJECTIVES.values())], Field(discriminator="name")]
