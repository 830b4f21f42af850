"""eksft.eval.stats: coverage of the bootstrap intervals, size and power of the paired test, agreement with scipy.

The simulations draw problems from a population of success rates (Beta(2, 3), mean 0.4) and n = 8 Bernoulli
answers per problem; a problem's score is its share of correct answers (avg@n of one problem). Their seeds are
fixed, so the counts below are deterministic; the bounds are the issue's acceptance bounds.
"""

import itertools

import numpy as np
import pytest

from eksft.eval.stats import (_resampled_means, bootstrap_ci, paired_difference, pass_at_k_per_problem, stratified_bootstrap_ci,
                              stratified_paired_difference)
from rl.metrics import pass_at_k

ALPHA, BETA = 2.0, 3.0
POPULATION_MEAN = ALPHA / (ALPHA + BETA)
P, N = 64, 8
SIMULATIONS = 1000


def _scores(rng, rates, seeds=None):
    """Per-problem avg@n: [P], or [seeds, P] for independent samplings of the same problems."""
    shape = rates.shape if seeds is None else (seeds, rates.size)
    return rng.binomial(N, np.broadcast_to(rates, shape)) / N


def test_bootstrap_ci_covers_the_population_mean_for_one_seed():
    rng = np.random.default_rng(1234)
    covered = 0
    for sim in range(SIMULATIONS):
        values = _scores(rng, rng.beta(ALPHA, BETA, size=P))
        est, low, high = bootstrap_ci(values, seed=sim)
        assert low <= est <= high and est == pytest.approx(values.mean())
        covered += low <= POPULATION_MEAN <= high
    assert 0.93 <= covered / SIMULATIONS <= 0.97, covered


def test_bootstrap_ci_covers_the_population_mean_for_three_seeds():
    rng = np.random.default_rng(4321)
    covered = 0
    for sim in range(SIMULATIONS):
        values = _scores(rng, rng.beta(ALPHA, BETA, size=P), seeds=3)  # the same 64 problems, sampled 3 times
        est, low, high = bootstrap_ci(values, seed=sim)
        assert est == pytest.approx(values.mean())
        covered += low <= POPULATION_MEAN <= high
    assert 0.90 <= covered / SIMULATIONS <= 0.99, covered


def test_paired_difference_size_and_power():
    rng = np.random.default_rng(99)
    false_alarms = detections = 0
    for sim in range(SIMULATIONS):
        rates = rng.beta(ALPHA, BETA, size=P)
        a, b = _scores(rng, rates), _scores(rng, rates)                     # no true effect
        false_alarms += paired_difference(a, b, seed=sim)[3] < 0.05
        better = _scores(rng, np.minimum(rates + 0.12, 1.0))               # every problem 0.12 easier
        diff, low, high, p = paired_difference(better, b, seed=sim)
        assert diff == pytest.approx(better.mean() - b.mean())
        detections += p < 0.05
    assert false_alarms / SIMULATIONS <= 0.06, false_alarms
    assert detections / SIMULATIONS >= 0.80, detections


def test_paired_difference_sign_follows_a_minus_b():
    a, b = np.array([1.0, 0.75, 1.0, 0.5, 1.0, 0.75]), np.array([0.5, 0.5, 0.25, 0.5, 0.75, 0.25])
    diff, low, high, p = paired_difference(a, b)
    assert diff == pytest.approx(a.mean() - b.mean()) and diff > 0 and low > 0
    rdiff, rlow, rhigh, rp = paired_difference(b, a)
    assert rdiff == pytest.approx(-diff) and rhigh < 0 and rp == p


def test_sign_flip_p_value_is_exact_for_few_problems():
    # 6 problems: 64 sign patterns <= n_boot, so the p-value is the exact share of patterns with |T*| >= |T|
    a, b = np.array([1.0, 0.5, 0.75, 0.25, 1.0, 0.5]), np.array([0.5, 0.5, 0.25, 0.5, 0.25, 0.0])
    d = a - b
    brute = np.mean([abs(np.dot(s, d)) >= abs(d.sum()) - 1e-12 for s in itertools.product((1, -1), repeat=6)])
    assert paired_difference(a, b)[3] == pytest.approx(brute)
    assert paired_difference(a, a)[:4] == (0.0, 0.0, 0.0, 1.0)  # identical systems: no difference at all


def test_two_level_bootstrap_resamples_seeds_and_problems():
    # Brute force for S = 2 seeds, P = 2 problems: a replicate is the mean of values[seeds][:, problems] for one
    # of 4 equally likely seed draws x 4 problem draws. The replicates must follow that law.
    values = np.array([[0.0, 1.0], [0.5, 0.25]])
    exact = np.array([values[list(s)][:, list(q)].mean() for s in itertools.product(range(2), repeat=2)
                      for q in itertools.product(range(2), repeat=2)])
    replicates = _resampled_means([values], 100_000, seed=3)
    for value in np.unique(exact):
        assert np.mean(np.isclose(replicates, value)) == pytest.approx(np.mean(np.isclose(exact, value)), abs=0.01)
    assert np.all(np.isclose(replicates[:, None], np.unique(exact)[None, :]).any(axis=1))  # nothing else occurs


def test_bootstrap_ci_agrees_with_scipy_percentile():
    scipy_stats = pytest.importorskip("scipy.stats")
    values = np.random.default_rng(7).binomial(8, np.random.default_rng(8).beta(2, 2, size=40)) / 8
    est, low, high = bootstrap_ci(values, n_boot=20_000, seed=1)
    ref = scipy_stats.bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=20_000, method="percentile",
                                random_state=np.random.default_rng(2)).confidence_interval
    assert est == pytest.approx(values.mean())
    assert abs(low - ref.low) < 0.01 and abs(high - ref.high) < 0.01


def test_paired_p_value_agrees_with_scipy_permutation_test():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    a, b = rng.binomial(8, 0.55, size=30) / 8, rng.binomial(8, 0.45, size=30) / 8
    ref = scipy_stats.permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                                       n_resamples=20_000, random_state=np.random.default_rng(6)).pvalue
    assert paired_difference(a, b, n_boot=20_000)[3] == pytest.approx(ref, abs=0.01)


def test_stratified_means_of_benchmark_means():
    x, y = np.array([1.0, 0.0, 1.0, 1.0]), np.array([0.5, 0.25])
    est, low, high = stratified_bootstrap_ci([x, y])
    assert est == pytest.approx((0.75 + 0.375) / 2) and low < est < high
    diff, _, _, p = stratified_paired_difference([x, y], [x, y])
    assert diff == 0.0 and p == 1.0
    # one stratum is exactly the unstratified function (same draws for the same seed)
    assert stratified_bootstrap_ci([x], seed=4) == bootstrap_ci(x, seed=4)


def test_deterministic_and_degenerate_cases():
    v = np.linspace(0, 1, 17)
    assert bootstrap_ci(v, seed=11) == bootstrap_ci(v, seed=11)
    assert bootstrap_ci(v, seed=11) != bootstrap_ci(v, seed=12)
    est, low, high = bootstrap_ci([0.5])
    assert est == 0.5 and np.isnan(low) and np.isnan(high)  # one problem, one seed: nothing to resample
    assert bootstrap_ci([0.25, 0.25, 0.25]) == (0.25, 0.25, 0.25)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 2, 2)), "shape"), ([], "no scores"), ([0.5, float("nan")], "finite")])
def test_bad_input_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(bad)


def test_paired_difference_refuses_unpaired_shapes():
    with pytest.raises(ValueError, match="paired"):
        paired_difference([0.5, 0.25], [0.5, 0.25, 1.0])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([0.5, 0.25], level=95)


def test_pass_at_k_per_problem_is_the_unbiased_estimator():
    counts = [0, 1, 3, 8]
    assert pass_at_k_per_problem(counts, 8, 2).tolist() == [pass_at_k(8, c, 2) for c in counts]
    assert pass_at_k_per_problem(counts, 8, 8).tolist() == [0.0, 1.0, 1.0, 1.0]
