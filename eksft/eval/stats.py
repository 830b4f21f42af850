"""Uncertainty of evaluation numbers: bootstrap intervals and paired tests over problems (and seeds).

    est, low, high = bootstrap_ci(per_problem_scores)                      # [P], or [S, P] for S seeds
    diff, low, high, p = paired_difference(eksft_scores, sft_scores)       # same problems (and seeds)

The problems of a benchmark are a sample from a population of problems, and the n answers per problem are a
sample of the model's answers; an average over them is an estimate with an error. These functions treat the
problem as the unit that is resampled (its score already averages its n samples), as careful evaluation
practice does. With several seeds (independent trainings or samplings of the same problems), ``values`` is
``[S, P]`` and the bootstrap has two levels: resample the seeds, then the problems; the estimate is the grand
mean. Several benchmarks (strata) are combined by :func:`stratified_bootstrap_ci` /
:func:`stratified_paired_difference`: the estimate is the unweighted mean of the benchmarks' means (the
report's *Average* column), and each benchmark's problems are resampled within that benchmark.

Intervals are percentile intervals (the ``level`` quantiles of the resampled means): the statistic is a mean
of bounded scores, whose bootstrap distribution is close to symmetric at the sizes used here, and percentile
intervals stay inside [0, 1] for accuracies. The p-value of a paired difference comes from a sign-flip
permutation test over problems: under "no difference", the two systems' scores on a problem are exchangeable,
so each problem's difference is as likely to have either sign. It is exact (all 2^P flips) when 2^P <= n_boot,
otherwise estimated from n_boot random flips as ``(1 + hits) / (1 + n_boot)``.

Everything is numpy, deterministic given ``seed``; no function here reads a file.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import numpy as np

from rl.metrics import pass_at_k

__all__ = ["bootstrap_ci", "paired_difference", "pass_at_k_per_problem", "stratified_bootstrap_ci",
           "stratified_paired_difference"]


def _as_seeds_by_problems(values, name: str) -> np.ndarray:
    """``values`` as a float64 array [S, P] (a [P] array is one seed)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected per-problem scores [P] or [S, P], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: no scores (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: scores must be finite")
    return arr


def _strata(strata: Sequence, name: str) -> list[np.ndarray]:
    arrays = [_as_seeds_by_problems(v, f"{name}[{i}]") for i, v in enumerate(strata)]
    if not arrays:
        raise ValueError(f"{name}: no strata")
    seeds = {a.shape[0] for a in arrays}
    if len(seeds) != 1:
        raise ValueError(f"{name}: every stratum needs the same number of seeds, got {sorted(seeds)}")
    return arrays


def _check_level(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")


def _draw_counts(rng: np.random.Generator, size: int, n_boot: int) -> np.ndarray:
    """[n_boot, size] float counts: how often each of ``size`` items is drawn in ``size`` draws with replacement."""
    draws = rng.integers(size, size=(n_boot, size)) + np.arange(n_boot)[:, None] * size
    return np.bincount(draws.ravel(), minlength=n_boot * size).reshape(n_boot, size).astype(np.float64)


@functools.lru_cache(maxsize=8)
def _bootstrap_counts(seed: int, n_boot: int, num_seeds: int, sizes: tuple[int, ...]):
    """The draw counts of seeds [n_boot, S] and of each stratum's problems [n_boot, P_i] for ``seed``.

    They depend only on the seed and the shapes, and a report asks for the same shapes hundreds of times
    (every metric of every row), so they are drawn once (read-only arrays, a few MB each).
    """
    rng = np.random.default_rng(seed)
    counts = (_draw_counts(rng, num_seeds, n_boot), *(_draw_counts(rng, size, n_boot) for size in sizes))
    for c in counts:
        c.setflags(write=False)
    return counts[0], counts[1:]


def _resampled_means(strata: list[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """[n_boot] bootstrap replicates of the mean over strata of each stratum's grand mean.

    One replicate draws S seeds with replacement (shared by the strata: a seed is one whole run), then in each
    stratum P problems with replacement, and takes the mean of ``values[seeds][:, problems]``. With draw counts
    ``cs`` [S] and ``cp`` [P] that mean is ``cs @ values @ cp / (S * P)``, so no resampled copy is built.
    """
    num_seeds = strata[0].shape[0]
    cs, cps = _bootstrap_counts(seed, n_boot, num_seeds, tuple(v.shape[1] for v in strata))
    total = np.zeros(n_boot)
    for values, cp in zip(strata, cps):
        total += np.einsum("bs,sp,bp->b", cs, values, cp) / (num_seeds * values.shape[1])
    return total / len(strata)


def _interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _grand_mean(strata: list[np.ndarray]) -> float:
    return float(np.mean([v.mean() for v in strata]))


def stratified_bootstrap_ci(strata: Sequence, *, level: float = 0.95, n_boot: int = 2000,
                            seed: int = 0) -> tuple[float, float, float]:
    """``(estimate, low, high)`` of the unweighted mean over strata (benchmarks) of their mean scores.

    Each stratum is ``[P_i]`` or ``[S, P_i]`` (the same S seeds in every stratum). Problems are resampled
    within their stratum; seeds are resampled once per replicate for all strata. ``low``/``high`` are NaN
    when no stratum has two problems and there is one seed (nothing to resample).
    """
    _check_level(level, n_boot)
    arrays = _strata(strata, "strata")
    estimate = _grand_mean(arrays)
    if arrays[0].shape[0] == 1 and all(v.shape[1] < 2 for v in arrays):
        return estimate, float("nan"), float("nan")
    low, high = _interval(_resampled_means(arrays, n_boot, seed), level)
    return estimate, low, high


def bootstrap_ci(values, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``(estimate, low, high)``: the mean of per-problem scores and its percentile bootstrap interval.

    values: ``[P]`` per-problem scores, or ``[S, P]`` for S seeds on the same P problems (two-level
            bootstrap: resample seeds, then problems; the estimate is the grand mean).
    level:  coverage of the interval (0.95: the 2.5% and 97.5% quantiles of ``n_boot`` resampled means).
    """
    return stratified_bootstrap_ci([values], level=level, n_boot=n_boot, seed=seed)


@functools.lru_cache(maxsize=8)
def _random_signs(seed: int, n_flips: int, num: int) -> np.ndarray:
    """[n_flips, num] random +-1 (cached like ``_bootstrap_counts``: the same shapes recur across a report)."""
    signs = 1.0 - 2.0 * np.random.default_rng([seed, 1]).integers(0, 2, size=(n_flips, num))
    signs.setflags(write=False)
    return signs


def _sign_flip_p_value(weighted: np.ndarray, n_flips: int, seed: int) -> float:
    """Two-sided p-value of ``sum(weighted)`` under random signs of its terms (one term per problem)."""
    observed = abs(float(weighted.sum()))
    tolerance = 1e-12 * max(1.0, observed)  # equal statistics computed in another order still count as hits
    num = weighted.size
    if 2 ** num <= n_flips:  # every sign pattern: the exact permutation distribution
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=num)))
        return float(np.mean(np.abs(signs @ weighted) >= observed - tolerance))
    hits = int(np.count_nonzero(np.abs(_random_signs(seed, n_flips, num) @ weighted) >= observed - tolerance))
    return (1 + hits) / (1 + n_flips)


def stratified_paired_difference(a_strata: Sequence, b_strata: Sequence, *, level: float = 0.95,
                                 n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float, float]:
    """``(diff, low, high, p_value)`` for the mean over strata of ``mean(a_i) - mean(b_i)``, paired by problem.

    ``a_strata[i]`` and ``b_strata[i]`` hold the two systems' scores on the same problems (and seeds), each
    ``[P_i]`` or ``[S, P_i]``. The interval bootstraps the per-problem differences as
    :func:`stratified_bootstrap_ci` does; the p-value flips the sign of each problem's difference (averaged
    over seeds: under the null a problem's two sets of runs are exchangeable, not single runs across seeds).
    """
    _check_level(level, n_boot)
    a_arrays, b_arrays = _strata(a_strata, "a"), _strata(b_strata, "b")
    if len(a_arrays) != len(b_arrays):
        raise ValueError(f"a has {len(a_arrays)} strata but b has {len(b_arrays)}")
    for i, (a, b) in enumerate(zip(a_arrays, b_arrays)):
        if a.shape != b.shape:
            raise ValueError(f"stratum {i}: a has shape {a.shape} but b has {b.shape}: the scores must be paired "
                             "(same problems, same seeds)")
    diffs = [a - b for a, b in zip(a_arrays, b_arrays)]
    diff, low, high = stratified_bootstrap_ci(diffs, level=level, n_boot=n_boot, seed=seed)
    # diff = sum over problems of weight * (seed-mean difference), weight = 1 / (strata * P_i)
    weighted = np.concatenate([d.mean(axis=0) / (len(diffs) * d.shape[1]) for d in diffs])
    p_value = _sign_flip_p_value(weighted, n_boot, seed)
    return diff, low, high, p_value


def paired_difference(a, b, *, level: float = 0.95, n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float, float, float]:
    """``(diff, low, high, p_value)``: ``diff = mean(a) - mean(b)`` with its bootstrap interval and a two-sided
    sign-flip permutation p-value.

    a, b: per-problem scores of two systems on the same problems, ``[P]``, or ``[S, P]`` paired by seed too.
    """
    return stratified_paired_difference([a], [b], level=level, n_boot=n_boot, seed=seed)


def pass_at_k_per_problem(correct_counts: Sequence[int], n: int, k: int) -> np.ndarray:
    """``[P]`` unbiased pass@k of each problem (c correct of n samples), the values the pass@k curves bootstrap."""
    return np.array([pass_at_k(n, int(c), k) for c in correct_counts], dtype=np.float64)
