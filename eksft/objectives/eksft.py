"""EKSFT: CE on the tokens outside the masked set, an entropy bonus on S_H, a KL pull on S_KL.

L = CE(valid tokens not in M) - lambda_entropy * mean_{S_H} H_t / log V + lambda_kl * mean_{S_KL} KL_t

Unlike the authors' code: the KL is the true KL(policy || reference), the lambdas are
constant, and the selection statistics are the detached values of the same forward.
`select_eksft_tokens` is the selection: the loss and `eksft inspect-masks` both call it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from .parts import LossParts, LossTerm
from .registry import get_objective, register
from .selection import Combine, Scope, TokenSelection, select_masked_tokens, selection_decided_by_ties
from .settings import ObjectiveSettings
from rl.common.token_stats import IGNORE_INDEX, response_metrics, token_statistics


class EKSFTSettings(ObjectiveSettings):
    """EKSFT's selection and regularisers (defaults: the authors' script)."""

    name: Literal["eksft"] = "eksft"
    ratio: float = 0.2
    combine: Combine = "union"
    largest_entropy: bool = True
    largest_kl: bool = True
    scope: Scope = "sequence"
    lambda_entropy: float = Field(0.05, allow_inf_nan=False)
    lambda_kl: float = Field(0.05, allow_inf_nan=False)

    @field_validator("ratio")
    @classmethod
    def _in_unit_interval(cls, ratio: float) -> float:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be within [0, 1], got {ratio}")
        return ratio


def select_eksft_tokens(
    logits: Tensor, labels: Tensor, ref_logits: Tensor, settings: EKSFTSettings
) -> TokenSelection:
    """The statistics of this forward and the tokens EKSFT selects on their detached values.

    S_H / S_KL: per scope, the k = floor(ratio * n) response tokens of largest (or smallest) entropy / KL
    to the reference; the removed set is their union or intersection (see `select_masked_tokens`).
    """
    mask = labels != IGNORE_INDEX
    stats = token_statistics(logits, mask, ref_logits=ref_logits, labels=labels, chunk_size=settings.chunk_size)
    kl = stats.kl.detach()
    removed, s_entropy, s_kl = select_masked_tokens(
        stats.entropy.detach(),
        kl,
        mask,
        settings.ratio,
        combine=settings.combine,
        largest_entropy=settings.largest_entropy,
        largest_kl=settings.largest_kl,
        scope=settings.scope,
    )
    ties = selection_decided_by_ties(kl, s_kl, mask, scope=settings.scope)
    return TokenSelection(stats, mask, removed, s_entropy, s_kl, ties)


@register(EKSFTSettings, needs_reference=True, select=select_eksft_tokens)
def eksft_parts(logits: Tensor, labels: Tensor, ref_logits: Tensor | None, config: EKSFTSettings) -> LossParts:
    """Terms `ce` (kept tokens), `entropy` (S_H, weight -lambda_entropy), `kl` (S_KL, weight lambda_kl)."""
    chosen = select_eksft_tokens(logits, labels, ref_logits, config)
    stats, mask, s_entropy, s_kl = chosen.stats, chosen.mask, chosen.s_entropy, chosen.s_kl
    kept = mask & ~chosen.removed
    log_vocab = math.log(logits.shape[-1])
    terms = {
        "ce": LossTerm(torch.where(kept, -stats.label_logprob, 0).sum(-1), kept.sum(-1)),
        "entropy": LossTerm(
            torch.where(s_entropy, stats.entropy, 0).sum(-1) / log_vocab, s_entropy.sum(-1), -config.lambda_entropy
        ),
        "kl": LossTerm(torch.where(s_kl, stats.kl, 0).sum(-1), s_kl.sum(-1), config.lambda_kl),
    }
    union = (s_entropy | s_kl).sum()
    metrics = {
        "ce": terms["ce"].value(aggregation=config.aggregation).detach().float(),
        "entropy_bonus": -terms["entropy"].value(aggregation=config.aggregation).detach().float(),
        "kl_term": terms["kl"].value(aggregation=config.aggregation).detach().float(),
        **response_metrics(stats, mask),
        "removed_fraction": (chosen.removed.sum() / mask.sum().clamp(min=1)).float(),
        "iou_entropy_kl": ((s_entropy & s_kl).sum() / union.clamp(min=1)).float(),
        "tokens_trained": kept.sum().float(),
        "kl_ties": torch.tensor(float(chosen.kl_ties)),
    }
    return LossParts(terms, metrics, config.aggregation)


def eksft_loss(
    logits: Tensor, labels: Tensor, ref_logits: Tensor, config: EKSFTSettings | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """`(loss, metrics)` of EKSFT, locally normalised; `metrics["entropy_bonus"]` is the
    (positive) value subtracted from the loss, `metrics["kl_term"]` the value added."""
    return get_objective("eksft")(logits, labels, ref_logits, config)
