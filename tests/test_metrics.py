"""pass@k / avg@n / maj@k against brute force and exact arithmetic."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from rl.metrics import maj_at_k, mean_at_n, pass_at_k, pass_at_k_groups, power_of_two_ks


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_matches_exact_fractions_large_n() -> None:
    n = 200
    for c in (0, 1, 2, 7, 50, 133, 190, 199, 200):
        for k in (1, 2, 5, 10, 32, 100, 150, 200):
            exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
            assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_pass_at_k_edges() -> None:
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c = 2 < k = 3
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(1, 1, 1) == 1.0
    assert isinstance(pass_at_k(5, 2, 2), float)


@pytest.mark.parametrize(
    "n,c,k,message",
    [(5, -1, 1, r"c must satisfy"), (5, 6, 1, r"c must satisfy"), (5, 2, 0, r"k must satisfy"),
     (5, 2, 6, r"k must satisfy"), (0, 0, 1, r"n must be >= 1"), (5, 2, 1.0, r"\bk\b.*int"),
     (5.0, 2, 1, r"\bn\b.*int"), (5, True, 1, r"\bc\b.*int")],
)
def test_pass_at_k_invalid(n, c, k, message) -> None:
    with pytest.raises(ValueError, match=message):  # each case fails on its own check
        pass_at_k(n, c, k)


def test_groups_and_mean_at_n() -> None:
    assert pass_at_k_groups([0, 4], n=4, k=2) == pytest.approx(0.5)
    assert pass_at_k_groups([1, 2], n=4, k=1) == pytest.approx((0.25 + 0.5) / 2)
    assert mean_at_n([1, 2, 4], n=4) == pytest.approx(7 / 12)
    # avg@n equals mean pass@1
    assert mean_at_n([1, 3], 4) == pytest.approx(pass_at_k_groups([1, 3], 4, 1))
    with pytest.raises(ValueError):
        pass_at_k_groups([], 4, 1)
    with pytest.raises(ValueError):
        mean_at_n([5], 4)
    with pytest.raises(ValueError):
        mean_at_n([], 4)


@pytest.mark.parametrize("n", range(1, 70))
def test_power_of_two_ks_are_the_powers_below_n_then_n(n: int) -> None:
    assert power_of_two_ks(n) == sorted({k for k in range(1, n) if k & (k - 1) == 0} | {n})


def test_power_of_two_ks_invalid() -> None:
    with pytest.raises(ValueError, match="n must be >= 1"):
        power_of_two_ks(0)


def test_grpo_rollout_metrics_report_pass_at_the_power_of_two_ks() -> None:
    """The trainer's pass@k over its groups: k = 1, 2, 4, ..., G, each the mean of the unbiased estimator."""
    from types import SimpleNamespace

    from rl.grpo.trainer import Group, GRPOTrainer
    from rl.rollout import Sample

    flags = [[True, False, False, False, False, True], [False] * 6, [True] * 6]
    sample = Sample(prompt_ids=[1], completion_ids=[2, 3], logprobs=[0.0, 0.0], text="", finish_reason="stop")
    groups = [Group({}, [1], [sample] * 6, [float(f) for f in g], g) for g in flags]
    metrics = GRPOTrainer._rollout_metrics(SimpleNamespace(cfg=SimpleNamespace(group_size=6)), groups)
    assert sorted(int(key[5:]) for key in metrics if key.startswith("pass@")) == [1, 2, 4, 6]
    for k in (1, 2, 4, 6):
        assert metrics[f"pass@{k}"] == pytest.approx(sum(_brute_pass_at_k(6, sum(g), k) for g in flags) / 3)


def test_maj_at_k_examples() -> None:
    answers = ["3", "5", "5", "3", "3"]
    flags = [True, False, False, True, True]
    assert maj_at_k(answers, flags, 5) == 1.0  # "3" x3 beats "5" x2
    assert maj_at_k(answers, flags, 3) == 0.0  # first 3: "5" x2 wins
    assert maj_at_k(answers, flags, 4) == 1.0  # tie 2-2: earliest ("3") wins
    assert maj_at_k(answers, flags, 1) == 1.0
    # None answers do not vote; all None -> 0
    assert maj_at_k([None, None, "7"], [False, False, True], 3) == 1.0
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    # tie, the wrong answer first
    assert maj_at_k(["1", "2"], [False, True], 2) == 0.0


def test_maj_at_k_invalid() -> None:
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True, False], 1)
    with pytest.raises(ValueError):
        maj_at_k(["1", "2"], [True, False], 3)
    with pytest.raises(ValueError):
        maj_at_k(["1", "2"], [True, False], 0)
