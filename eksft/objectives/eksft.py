"""EKSFT: CE on the tokens outside the masked set, an entropy bonus on S_H, a KL pull on S_KL.

L = CE(valid tokens not in M) - lambda_entropy * mean_{S_H} H_t / log V + lambda_kl * mean_{S_KL} KL_t

Unlike the authors' code: the KL is the true KL(policy || reference), the lambdas are
constant, and the selection statistics are the detached values of the same forward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import ObjectiveConfig
from .parts import LossParts, LossTerm
from .registry import get_objective, register
from .selection import select_masked_tokens, selection_decided_by_ties
from rl.common.token_stats import IGNORE_INDEX, response_metrics, token_statistics


@register("eksft", needs_reference=True)
def eksft_parts(logits: Tensor, labels: Tensor, ref_logits: Tensor | None, config: ObjectiveConfig) -> LossParts:
    """Terms `ce` (kept tokens), `entropy` (S_H, weight -lambda_entropy), `kl` (S_KL, weight lambda_kl)."""
    mask = labels != IGNORE_INDEX
    stats = token_statistics(logits, mask, ref_logits=ref_logits, labels=labels, chunk_size=config.chunk_size)
    entropy, kl = stats.entropy.detach(), stats.kl.detach()
    removed, s_entropy, s_kl = select_masked_tokens(
        entropy,
        kl,
        mask,
        config.ratio,
        combine=config.combine,
        largest_entropy=config.largest_entropy,
        largest_kl=config.largest_kl,
        scope=config.scope,
    )
    kept = mask & ~removed
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
        "removed_fraction": (removed.sum() / mask.sum().clamp(min=1)).float(),
        "iou_entropy_kl": ((s_entropy & s_kl).sum() / union.clamp(min=1)).float(),
        "tokens_trained": kept.sum().float(),
        "kl_ties": torch.tensor(float(selection_decided_by_ties(kl, s_kl, mask, scope=config.scope))),
    }
    return LossParts(terms, metrics, config.aggregation)


def eksft_loss(
    logits: Tensor, labels: Tensor, ref_logits: Tensor, config: ObjectiveConfig | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """`(loss, metrics)` of EKSFT, locally normalised; `metrics["entropy_bonus"]` is the
    (positive) value subtracted from the loss, `metrics["kl_term"]` the value added."""
    return get_objective("eksft")(logits, labels, ref_logits, config)
