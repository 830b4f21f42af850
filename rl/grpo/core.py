"""GRPO algorithm, pure tensor functions (no model, no I/O): one import point.

* `group_advantages`, `zero_variance_groups`: group-relative advantages (unbiased std).
* `dynamic_sampling_filter`, `fill_groups`, `FillStats`: DAPO dynamic sampling.
* `kl_k3`, `policy_loss`, `aggregate`, `valid_counts`: clipped loss, KL, entropy bonus,
  three aggregations, global normalisation across micro-batches; `loss_has_gradient`: whether a
  micro-batch's loss can have a gradient (else its backward is skipped).
* `mask_truncated`, `minibatches`: overlong masking, mini-batch index splits.

See the docstrings of `rl.grpo.advantages`, `rl.grpo.loss` and `rl.grpo.batching`.
"""

from __future__ import annotations

from .advantages import (
    FillStats,
    dynamic_sampling_filter,
    fill_groups,
    group_advantages,
    group_rewards,
    zero_variance_groups,
)
from .batching import mask_truncated, minibatches
from .loss import (
    AGGREGATIONS,
    LOG_RATIO_CLAMP,
    Aggregation,
    aggregate,
    kl_k3,
    loss_has_gradient,
    policy_loss,
    valid_counts,
)

__all__ = [
    "AGGREGATIONS",
    "LOG_RATIO_CLAMP",
    "Aggregation",
    "FillStats",
    "aggregate",
    "dynamic_sampling_filter",
    "fill_groups",
    "group_advantages",
    "group_rewards",
    "kl_k3",
    "loss_has_gradient",
    "mask_truncated",
    "minibatches",
    "policy_loss",
    "valid_counts",
    "zero_variance_groups",
]
