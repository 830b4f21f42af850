"""GRPO / PPO-clip policy loss with k3 KL, entropy bonus and three loss aggregations.

Per valid response token (docs/method.md, GRPO loss):

    loss_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta k3_t - alpha H_t
    rho_t  = exp(logp_t - old_logp_t)

``eps_high > eps_low`` is DAPO's clip-higher. ``k3_t`` is the k3 estimator of
KL(pi_theta || pi_ref) (`kl_k3`), ``H_t`` the policy's entropy at that position (computed
by the caller from the logits, with gradient).

Aggregation (how token losses become one number; the same for all three terms):

* ``token-mean``: sum over all valid tokens / number of valid tokens (DAPO, verl
  "token-mean"): every token weighs the same, long answers weigh more.
* ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (original
  GRPO): every sequence weighs the same.
* ``seq-mean-token-sum-norm``: each sequence's token SUM divided by a constant
  ``max_response_len``, then mean over sequences (Dr. GRPO: no length bias).

Sequences without any valid token (padding rows, completions removed by `mask_truncated`)
contribute nothing and are not counted in the sequence means.

Global normalisation (gradient accumulation / several micro-batches, data parallelism).
Pass the counts of the WHOLE batch: ``num_tokens`` (token-mean) = valid tokens in the
whole batch, ``num_seqs`` (seq-mean variants) = sequences with at least one valid token in
the whole batch (`valid_counts` gives both for a mask; sum them over micro-batches and, with
data parallelism, all-reduce them). Each micro-batch loss is then its share of the
full-batch loss: the micro-batch losses (and their gradients) SUM to the full-batch loss
(and gradient). Do not divide by the number of micro-batches; with DDP, whose all-reduce
averages gradients, multiply the loss by the world size (or sum gradients instead).
Without them, the loss is normalised by the micro-batch's own counts.

Numerics: the loss is computed in float32 (float64 input stays float64); masked positions
are replaced by 0 BEFORE any exp, so padding with garbage log-probs (even inf/nan) affects
neither the loss nor the gradient. The log-ratios are clamped to [-20, 20] before exp, as
verl does: this bounds rho and k3, and stops the gradient of a token whose log-ratio is
beyond that (far outside any clip range, where PPO's gradient is zero anyway except for
A < 0 with rho > e^20).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "Aggregation",
    "AGGREGATIONS",
    "LOG_RATIO_CLAMP",
    "aggregate",
    "kl_k3",
    "loss_has_gradient",
    "policy_loss",
    "valid_counts",
]

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)

LOG_RATIO_CLAMP = 20.0
"""Log-ratios (``ref - logp`` in k3, ``logp - old_logp`` in rho) are clamped to +-this before exp."""


def kl_k3(logp: Tensor, ref_logp: Tensor, clamp: float = LOG_RATIO_CLAMP) -> Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) from tokens sampled from pi.

    With ``x = ref_logp - logp`` (= log pi_ref/pi at the sampled token),
    ``k3 = exp(x) - x - 1``: unbiased for KL(pi || pi_ref) when tokens come from pi, and
    >= 0 for every sample (Schulman, "Approximating KL divergence"; GRPO's KL term).

    Numerics: ``x`` is clamped to [-clamp, clamp] (default 20, as verl) so exp cannot
    overflow, which also stops the gradient of tokens beyond the clamp; computed as
    ``expm1(x) - x`` (accurate for small x) and clamped at 0 against rounding, so the
    result is exactly 0 where ``logp == ref_logp`` and never negative.

    Args:
        logp: log-probs of the sampled tokens under pi (any shape).
        ref_logp: log-probs of the same tokens under pi_ref (same shape).
        clamp: bound on ``|ref_logp - logp|``.

    Returns:
        Tensor of the broadcast shape, >= 0, differentiable w.r.t. both inputs.
    """
    x = (ref_logp - logp).clamp(-clamp, clamp)
    return (torch.expm1(x) - x).clamp_min(0.0)


def loss_has_gradient(advantages: Sequence[float], trained: Sequence[bool], *, beta: float = 0.0,
                      alpha: float = 0.0) -> bool:
    """Whether `policy_loss` over sequences with these per-sequence advantages can have a non-zero gradient.

    Only its KL term (``beta > 0``), its entropy bonus (``alpha > 0``) and the clipped term of a trained sequence
    with ``A != 0`` depend on the parameters: the clipped term of a token is ``-A * rho`` or ``-A * clip(rho)``, whose
    gradient is ``A`` times something finite (rho is clamped). So sequences that are all untrained or have ``A = 0``
    (a zero-variance group: every reward equal) give exactly zero gradient, and their backward can be skipped
    without changing the update. A NaN advantage counts as non-zero (its NaN gradient is not hidden)."""
    if beta > 0 or alpha > 0:
        return True
    return any(keep and a != 0 for a, keep in zip(advantages, trained, strict=True))


def valid_counts(response_mask: Tensor) -> tuple[float, float]:
    """(number of valid tokens, number of sequences with >= 1 valid token) of a [N, T] mask.

    Sum these over the micro-batches (and ranks) of a batch to get the ``num_tokens`` /
    ``num_seqs`` that make `policy_loss` normalise globally.
    """
    mask = response_mask.bool()
    return float(mask.sum().item()), float(mask.any(dim=-1).sum().item())


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def aggregate(
    token_values: Tensor,
    response_mask: Tensor,
    aggregation: Aggregation = "token-mean",
    *,
    max_response_len: float | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> Tensor:
    """Reduce per-token values [N, T] to a scalar with one of the three aggregations.

    Masked positions of ``token_values`` must be finite (they are multiplied by 0).
    ``num_tokens`` / ``num_seqs`` replace the local denominators (global normalisation,
    see the module docstring). Every denominator is clamped to >= 1 (counts are integers),
    so an all-masked batch gives 0, not nan.
    """
    mask = response_mask.to(token_values.dtype)
    for name, value in (("num_tokens", num_tokens), ("num_seqs", num_seqs)):
        if value is not None and float(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if aggregation == "token-mean":
        denom = max(float(num_tokens), 1.0) if num_tokens is not None else mask.sum().clamp_min(1.0)
        return (token_values * mask).sum() / denom
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    seq_sums = (token_values * mask).sum(dim=-1)
    if aggregation == "seq-mean-token-mean":
        seq_values = seq_sums / mask.sum(dim=-1).clamp_min(1.0)
    else:  # seq-mean-token-sum-norm
        if max_response_len is None:
            raise ValueError("aggregation='seq-mean-token-sum-norm' needs max_response_len (Dr. GRPO's constant)")
        if not max_response_len > 0:
            raise ValueError(f"max_response_len must be > 0, got {max_response_len!r}")
        seq_values = seq_sums / float(max_response_len)
    if num_seqs is not None:
        denom = max(float(num_seqs), 1.0)
    else:
        denom = (mask.sum(dim=-1) > 0).sum().to(token_values.dtype).clamp_min(1.0)
    return seq_values.sum() / denom


def _masked_mean(values: Tensor, mask: Tensor, count: Tensor) -> Tensor:
    return ((values * mask).sum() / count).detach().float()


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    entropy: Tensor | None = None,
    alpha: float = 0.0,
    aggregation: Aggregation = "token-mean",
    max_response_len: float | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO policy loss, with optional k3 KL penalty and entropy bonus.

    Args:
        logp: [N, T] log-probs of the response tokens under the current policy (with grad).
        old_logp: [N, T] log-probs under the policy that generated them (treated as a
            constant: detached). With one update per rollout batch it equals ``logp.detach()``.
        advantages: [N] per-sequence (broadcast over tokens) or [N, T] per-token (detached).
        response_mask: [N, T] bool/0-1, True on the response tokens to train.
        eps_low, eps_high: rho is clipped to [1 - eps_low, 1 + eps_high].
        ref_logp: [N, T] reference log-probs (detached); needed when ``beta > 0``, and
            reported as metric ``kl`` whenever given.
        beta: weight of the k3 KL(pi || pi_ref) penalty.
        entropy: [N, T] per-token policy entropy (keeps its grad); needed when ``alpha > 0``.
        alpha: weight of the entropy bonus (subtracted).
        aggregation: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum-norm".
        max_response_len: the constant of "seq-mean-token-sum-norm" (e.g. max_new_tokens).
        num_tokens: global valid-token count for "token-mean" (see module docstring).
        num_seqs: global non-empty sequence count for the seq-mean aggregations.

    Returns:
        ``(loss, metrics)``: the scalar loss (float32, float64 for float64 input) and
        detached 0-dim float32 tensors, means over this call's valid tokens:
        ``pg_loss`` (the clipped term alone, aggregated like the loss), ``clip_fraction``
        (tokens where the min picked the clipped branch and it differed from the unclipped
        one, i.e. the token's gradient was clipped to 0) = ``clip_fraction_low`` (rho <
        1 - eps_low, A < 0) + ``clip_fraction_high`` (rho > 1 + eps_high, A > 0),
        ``approx_kl`` (k3 estimate of KL(pi_old || pi_theta), >= 0), ``ratio_mean`` /
        ``ratio_min`` / ``ratio_max``, ``kl`` (mean k3 to the reference, when
        ``ref_logp`` is given), ``entropy`` (when given), ``num_tokens`` / ``num_seqs``
        (local valid counts).
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be [N, T], got {tuple(logp.shape)}")
    shape = logp.shape
    for name, t in (("old_logp", old_logp), ("response_mask", response_mask), ("ref_logp", ref_logp), ("entropy", entropy)):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} must have the shape of logp {tuple(shape)}, got {tuple(t.shape)}")
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        advantages = advantages[:, None]
    elif advantages.shape != shape:
        raise ValueError(f"advantages must be [N]={shape[0]} or [N, T]={tuple(shape)}, got {tuple(advantages.shape)}")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    if beta < 0 or alpha < 0:
        raise ValueError(f"beta and alpha must be >= 0, got {beta}, {alpha}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    if alpha > 0 and entropy is None:
        raise ValueError("alpha > 0 needs entropy")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")

    dtype = _work_dtype(logp)
    mask = response_mask.bool()
    maskf = mask.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=logp.device)

    # Zero masked positions before exp: garbage there touches neither value nor gradient.
    log_ratio = torch.where(mask, logp.to(dtype) - old_logp.detach().to(dtype), zero)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = torch.where(mask, advantages.detach().to(dtype), zero)

    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg_tokens = torch.maximum(unclipped, clipped)  # = -min(rho A, clip(rho) A)
    total = pg_tokens

    agg = dict(aggregation=aggregation, max_response_len=max_response_len, num_tokens=num_tokens, num_seqs=num_seqs)

    kl_tokens = None
    if ref_logp is not None:
        ref = torch.where(mask, ref_logp.detach().to(dtype), zero)
        cur = torch.where(mask, logp.to(dtype), zero)
        kl_tokens = kl_k3(cur, ref)
        if beta > 0:
            total = total + beta * kl_tokens
    ent_tokens = None
    if entropy is not None:
        ent_tokens = torch.where(mask, entropy.to(dtype), zero)
        if alpha > 0:
            total = total - alpha * ent_tokens

    loss = aggregate(total, mask, **agg)

    with torch.no_grad():
        count = maskf.sum().clamp_min(1.0)
        is_clipped = (clipped > unclipped) & mask
        low = is_clipped & (ratio < 1.0 - eps_low)
        high = is_clipped & (ratio > 1.0 + eps_high)
        big = torch.finfo(dtype).max
        any_valid, one = mask.any(), torch.ones((), dtype=dtype, device=logp.device)
        metrics: dict[str, Tensor] = {
            "pg_loss": aggregate(pg_tokens.detach(), mask, **agg).float(),
            "clip_fraction": _masked_mean(is_clipped.to(dtype), maskf, count),
            "clip_fraction_low": _masked_mean(low.to(dtype), maskf, count),
            "clip_fraction_high": _masked_mean(high.to(dtype), maskf, count),
            # KL(pi_old || pi_theta) from tokens sampled from pi_old: k3 with the roles swapped.
            "approx_kl": _masked_mean(kl_k3(zero, log_ratio), maskf, count),
            "ratio_mean": _masked_mean(ratio, maskf, count),
            # 1.0 when nothing is valid; no host sync.
            "ratio_min": (torch.where(any_valid, torch.where(mask, ratio, big).amin(), one) if ratio.numel() else one).float(),
            "ratio_max": (torch.where(any_valid, torch.where(mask, ratio, -big).amax(), one) if ratio.numel() else one).float(),
            "num_tokens": maskf.sum().float(),
            "num_seqs": mask.any(dim=-1).sum().float(),
        }
        if kl_tokens is not None:
            metrics["kl"] = _masked_mean(kl_tokens, maskf, count)
        if ent_tokens is not None:
            metrics["entropy"] = _masked_mean(ent_tokens, maskf, count)
    return loss, metrics
