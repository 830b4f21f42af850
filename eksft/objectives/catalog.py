"""The objectives this package ships, and `ObjectiveConfig`: their settings as one type keyed on `name`.

Importing an objective's module registers it. A new objective is its module plus its name in the
import below; the recipe schema, the CLI's choices and `eksft inspect-masks` follow the registry.
"""

from __future__ import annotations

from . import dft, eksft, sft  # noqa: F401  (each registers itself)
from .registry import settings_union

ObjectiveConfig = settings_union()
"""The settings of any registered objective (a pydantic discriminated union on ``name``): a recipe's
``objective: {name: eksft, ratio: 0.3}`` validates as `EKSFTSettings`, and a key the named objective
does not have is an error."""
