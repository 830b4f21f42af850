"""Exploration metrics over groups of sampled answers: pass@k, avg@n, maj@k.

Pure Python (no numpy) so they can be imported anywhere, including inside
other trainers and evaluation scripts.
"""

from __future__ import annotations

from collections import Counter
from typing import Hashable, Sequence


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return value


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021).

    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{j=n-c+1}^{n} (1 - k/j)``:
    the binomials overflow float64 for n in the hundreds, the product does not.
    Needs ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    n, c, k = _check_int("n", n), _check_int("c", c), _check_int("k", k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must satisfy 0 <= c <= n={n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n={n}, got {k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    miss = 1.0
    for j in range(n - c + 1, n + 1):
        miss *= 1.0 - k / j
    return 1.0 - miss


def power_of_two_ks(n: int) -> list[int]:
    """The k reported for pass@k / maj@k over n samples: the powers of two below n, and n (1, 2, 4, ..., n)."""
    n = _check_int("n", n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [1 << i for i in range((n - 1).bit_length())] + [n]


def pass_at_k_groups(correct_counts: Sequence[int], n: int, k: int) -> float:
    """Mean pass@k over problems, each with n samples and ``correct_counts[i]`` correct."""
    if len(correct_counts) == 0:
        raise ValueError("correct_counts is empty")
    return sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts)


def mean_at_n(correct_counts: Sequence[int], n: int) -> float:
    """avg@n: mean accuracy over all n samples of all problems (= pass@1)."""
    n = _check_int("n", n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(correct_counts) == 0:
        raise ValueError("correct_counts is empty")
    for c in correct_counts:
        if not 0 <= _check_int("c", c) <= n:
            raise ValueError(f"each count must satisfy 0 <= c <= n={n}, got {c}")
    return sum(correct_counts) / (n * len(correct_counts))


def maj_at_k(
    answers: Sequence[Hashable | None], correct_flags: Sequence[bool], k: int
) -> float:
    """maj@k for one problem: 1.0 if the majority answer of the first k samples is correct.

    ``None`` answers (nothing extracted) do not vote; if all are None the
    result is 0.0. Ties go to the answer that appears first. Answers are
    compared as given, so canonicalise them first if "0.5" and "1/2" should
    count as one vote. The chosen answer's correctness is the flag of its
    first occurrence.
    """
    if len(answers) != len(correct_flags):
        raise ValueError(f"{len(answers)} answers but {len(correct_flags)} flags")
    k = _check_int("k", k)
    if not 1 <= k <= len(answers):
        raise ValueError(f"k must satisfy 1 <= k <= {len(answers)}, got {k}")
    votes = Counter(a for a in answers[:k] if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    for answer, flag in zip(answers[:k], correct_flags[:k]):
        if answer is not None and votes[answer] == top:
            return float(bool(flag))
    raise AssertionError("unreachable")
