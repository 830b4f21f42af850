"""Which response tokens EKSFT masks out of the cross-entropy.

Selection is a pure function of detached [B, T] statistics, vectorised with a stable
sort, so it is exact, deterministic and testable alone. `TokenSelection` is what an
objective's selection function returns (the registry keeps one per objective): the loss
and `eksft inspect-masks` both read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch
from torch import Tensor

from rl.common.token_stats import IGNORE_INDEX, TokenStats, token_statistics

Combine = Literal["union", "intersection"]
Scope = Literal["sequence", "batch"]

_MAX_DENOMINATOR = 2**31 - 1


def tokens_to_select(ratio: float, n_valid: Tensor) -> Tensor:
    """k = floor(ratio * n) per scope, exact for the decimal `ratio` as written.

    Float products misround (0.29 * 100 = 28.999…, floor 28), so `ratio` is read as the
    fraction of its shortest decimal repr ("0.29" -> 29/100; anything with up to nine
    decimals is exact, longer ones are rounded to a denominator below 2**31) and k is
    computed with integer arithmetic on the device.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be within [0, 1], got {ratio}")
    frac = Fraction(repr(float(ratio))).limit_denominator(_MAX_DENOMINATOR)
    return n_valid.long() * frac.numerator // frac.denominator


def _top_k(values: Tensor, valid: Tensor, k: Tensor, largest: bool) -> Tensor:
    """Per row of [R, N]: the k[r] valid entries with the largest (smallest) values.

    Stable sorts keep equal values in position order, so the earlier position wins a tie;
    a second stable sort on the invalid flag pushes invalid entries behind all valid ones.
    """
    order = torch.sort(values, dim=-1, descending=largest, stable=True).indices
    invalid_last = torch.sort((~valid).gather(-1, order).to(torch.uint8), dim=-1, stable=True).indices
    order = order.gather(-1, invalid_last)
    positions = torch.arange(values.shape[-1], device=values.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return valid & (rank < k[:, None])


def _rows(x: Tensor, scope: Scope) -> Tensor:
    """View [B, T] as the rows selection runs over: one per sequence, or one per batch."""
    if scope == "sequence":
        return x
    if scope == "batch":
        return x.reshape(1, -1)
    raise ValueError(f"scope must be 'sequence' or 'batch', got {scope!r}")


def select_masked_tokens(
    entropy: Tensor,
    kl: Tensor,
    mask: Tensor,
    ratio: float,
    combine: Combine = "union",
    largest_entropy: bool = True,
    largest_kl: bool = True,
    scope: Scope = "sequence",
) -> tuple[Tensor, Tensor, Tensor]:
    """Return boolean [B, T] `(removed, s_entropy, s_kl)`.

    In each scope (a sequence, or the whole micro-batch for scope="batch") with n valid
    tokens (mask == 1), k = floor(ratio * n) (see `tokens_to_select`); k == 0 selects
    nothing. `s_entropy` holds the k valid tokens of largest entropy (smallest if
    `largest_entropy=False`), `s_kl` likewise for KL, and `removed` is their union or
    intersection. Ties: among equal values the EARLIER position (row-major for
    scope="batch") is selected first. Tokens with mask == 0 are never selected.
    Pass detached statistics.
    """
    if combine not in ("union", "intersection"):
        raise ValueError(f"combine must be 'union' or 'intersection', got {combine!r}")
    valid = mask.bool()
    if entropy.shape != valid.shape or kl.shape != valid.shape:
        raise ValueError(
            f"entropy {tuple(entropy.shape)} and kl {tuple(kl.shape)} must match mask {tuple(valid.shape)}"
        )
    rows_valid = _rows(valid, scope)
    k = tokens_to_select(ratio, rows_valid.sum(-1))
    s_entropy = _top_k(_rows(entropy, scope), rows_valid, k, largest_entropy).reshape(valid.shape)
    s_kl = _top_k(_rows(kl, scope), rows_valid, k, largest_kl).reshape(valid.shape)
    removed = s_entropy | s_kl if combine == "union" else s_entropy & s_kl
    return removed, s_entropy, s_kl


def selection_decided_by_ties(
    values: Tensor,
    selected: Tensor,
    mask: Tensor,
    scope: Scope = "sequence",
    rtol: float = 1e-6,
    atol: float = 1e-9,
) -> bool:
    """True if in some scope the last selected value equals (within tolerance) the first
    value left out, i.e. the set was chosen by the position tie-break, not by the values.

    The typical case is step 0, where policy == reference makes every KL exactly zero.
    Works for largest and smallest selection alike: it compares both boundaries.
    """
    valid = _rows(mask.bool(), scope)
    values = _rows(values.detach(), scope)
    chosen = _rows(selected.bool(), scope) & valid
    left_out = valid & ~chosen
    inf = torch.tensor(float("inf"), dtype=values.dtype, device=values.device)
    min_chosen = torch.where(chosen, values, inf).amin(-1)
    max_chosen = torch.where(chosen, values, -inf).amax(-1)
    min_left = torch.where(left_out, values, inf).amin(-1)
    max_left = torch.where(left_out, values, -inf).amax(-1)
    has_boundary = chosen.any(-1) & left_out.any(-1)
    close = torch.isclose(min_chosen, max_left, rtol=rtol, atol=atol) | torch.isclose(
        max_chosen, min_left, rtol=rtol, atol=atol
    )
    return bool((has_boundary & close).any())


@dataclass(frozen=True)
class TokenSelection:
    """What an objective does with each response token, as [B, T] booleans over aligned positions.

    ``removed`` leaves the cross-entropy; ``s_entropy`` / ``s_kl`` are the sets the regularisers act on
    (``removed`` is their union or intersection). ``stats`` are the statistics of the same forward, with
    their graph; ``kl_ties`` says that the KL set was decided by the position tie-break.
    """

    stats: TokenStats
    mask: Tensor
    removed: Tensor
    s_entropy: Tensor
    s_kl: Tensor
    kl_ties: bool = False


def keep_every_token(logits: Tensor, labels: Tensor, ref_logits: Tensor | None, settings) -> TokenSelection:
    """The selection of an objective that trains on every response token (sft, dft): nothing is removed."""
    mask = labels != IGNORE_INDEX
    stats = token_statistics(logits, mask, ref_logits=ref_logits, labels=labels, chunk_size=settings.chunk_size)
    nothing = torch.zeros_like(mask)
    return TokenSelection(stats, mask, nothing, nothing, nothing)
