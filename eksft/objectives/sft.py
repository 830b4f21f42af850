"""Plain SFT: token-mean cross-entropy over all response tokens (the baseline)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .parts import LossParts, LossTerm
from .registry import get_objective, register
from .settings import ObjectiveSettings
from rl.common.token_stats import IGNORE_INDEX, masked_mean, response_metrics, token_statistics


class SFTSettings(ObjectiveSettings):
    """Plain SFT has only the common settings."""

    name: Literal["sft"] = "sft"


@register(SFTSettings, needs_reference=False)
def sft_parts(logits: Tensor, labels: Tensor, ref_logits: Tensor | None, config: SFTSettings) -> LossParts:
    """CE as one term; a given reference is only used for the `kl_mean` metric."""
    mask = labels != IGNORE_INDEX
    stats = token_statistics(logits, mask, ref_logits=ref_logits, labels=labels, chunk_size=config.chunk_size)
    nll = -stats.label_logprob
    terms = {"ce": LossTerm(torch.where(mask, nll, 0).sum(-1), mask.sum(-1))}
    metrics = {
        "ce": masked_mean(nll, mask),
        **response_metrics(stats, mask),
        "tokens_trained": mask.sum().to(torch.float32),
        "removed_fraction": torch.zeros((), dtype=torch.float32),
    }
    return LossParts(terms, metrics, config.aggregation)


def sft_loss(
    logits: Tensor, labels: Tensor, ref_logits: Tensor | None = None, config: SFTSettings | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """`(loss, metrics)` of plain SFT, locally normalised."""
    return get_objective("sft")(logits, labels, ref_logits, config)
