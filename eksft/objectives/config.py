"""Typed settings of the token-level objective (embedded in the recipe as `sft.objective`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ObjectiveConfig(BaseModel):
    """Objective name and EKSFT selection / regulariser settings (defaults: the authors' script).

    Fields only used by some objectives (e.g. `ratio` for `sft`) are ignored by the others.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "eksft"
    ratio: float = 0.2
    combine: Literal["union", "intersection"] = "union"
    largest_entropy: bool = True
    largest_kl: bool = True
    scope: Literal["sequence", "batch"] = "sequence"
    lambda_entropy: float = Field(0.05, allow_inf_nan=False)
    lambda_kl: float = Field(0.05, allow_inf_nan=False)
    chunk_size: int | None = Field(None, gt=0)
    # How token losses become the batch loss; see parts.py. The default is exactly invariant to
    # gradient accumulation; with batch size 1 (the authors' setting) both give the same number.
    aggregation: Literal["seq-mean-token-mean", "token-mean"] = "seq-mean-token-mean"

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from .registry import OBJECTIVES  # late: the registry imports this module

        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; allowed: {', '.join(sorted(OBJECTIVES))}")
        return name

    @field_validator("ratio")
    @classmethod
    def _in_unit_interval(cls, ratio: float) -> float:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be within [0, 1], got {ratio}")
        return ratio
