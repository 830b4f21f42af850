"""DFT (Dynamic Fine-Tuning, Wu et al. 2025, "On the Generalization of SFT").

Each token's CE is weighted by the detached probability of its label, sg(p(y_t)), which
rectifies the implicit 1/p reward of SFT; token-mean over all response tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .parts import LossParts, LossTerm
from .registry import get_objective, register
from .settings import ObjectiveSettings
from rl.common.token_stats import IGNORE_INDEX, masked_mean, response_metrics, token_statistics


class DFTSettings(ObjectiveSettings):
    """DFT has only the common settings."""

    name: Literal["dft"] = "dft"


@register(DFTSettings, needs_reference=False)
def dft_parts(logits: Tensor, labels: Tensor, ref_logits: Tensor | None, config: DFTSettings) -> LossParts:
    """Probability-weighted CE as one term; a given reference only feeds `kl_mean`."""
    mask = labels != IGNORE_INDEX
    stats = token_statistics(logits, mask, ref_logits=ref_logits, labels=labels, chunk_size=config.chunk_size)
    label_lp = stats.label_logprob
    weight = label_lp.detach().exp()
    terms = {"weighted_ce": LossTerm(torch.where(mask, -weight * label_lp, 0).sum(-1), mask.sum(-1))}
    metrics = {
        "ce": masked_mean(-label_lp, mask),
        "dft_weight_mean": masked_mean(weight, mask),
        **response_metrics(stats, mask),
        "tokens_trained": mask.sum().to(torch.float32),
        "removed_fraction": torch.zeros((), dtype=torch.float32),
    }
    return LossParts(terms, metrics, config.aggregation)


def dft_loss(
    logits: Tensor, labels: Tensor, ref_logits: Tensor | None = None, config: DFTSettings | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """`(loss, metrics)` of DFT, locally normalised."""
    return get_objective("dft")(logits, labels, ref_logits, config)
