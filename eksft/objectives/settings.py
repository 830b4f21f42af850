"""What the settings of every objective have; each objective subclasses this in its own module.

A recipe's objective is validated as the settings of the objective its `name` picks (the union
`ObjectiveConfig`, built in `catalog.py`), so a key that objective does not have is an error.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .parts import Aggregation


class ObjectiveSettings(BaseModel):
    """The fields every objective has; a subclass sets ``name: Literal["<its name>"]`` and adds its own."""

    model_config = ConfigDict(extra="forbid")

    name: str
    # Positions per [chunk, V] float32 temporary of the token statistics (None: a default budget).
    chunk_size: int | None = Field(None, gt=0)
    # How token losses become the batch loss; see parts.py. The default is exactly invariant to
    # gradient accumulation; with batch size 1 (the authors' setting) both give the same number.
    aggregation: Aggregation = "seq-mean-token-mean"
