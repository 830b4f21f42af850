"""pass@k-against-k curves of eksft.report.plots on tests/fixtures/run_small (n = 4 samples, 8 problems).

The expected numbers are computed here from the fixture's correct counts (make_run_small.py) with ``math.comb``,
not through ``problem_values``.
"""

import json
import shutil
from math import comb
from pathlib import Path

import pytest

from eksft.eval.stats import bootstrap_ci
from eksft.report.data import load_run
from eksft.report.plots import pass_at_k_curves, plot_pass_at_k_curves, write_plots

FIXTURE = Path(__file__).parent / "fixtures" / "run_small"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N = 4
SFT_AFTER_SFT_ARITHMETIC = [2, 1, 1, 3, 2, 1, 2, 1]  # arm sft, after_sft, embedded:arithmetic
BEFORE_ARITHMETIC = [0, 1, 0, 2, 1, 0, 3, 1]  # the starting model on embedded:arithmetic


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run_small"
    shutil.copytree(FIXTURE, run_dir)
    return load_run(run_dir)


def _labels(curves):
    return {arm: [c.label for c in cs] for arm, cs in curves.items()}


def _expected(counts, run):
    """(estimate, low, high) per k = 1..N from the correct counts: unbiased pass@k by binomials."""
    out = []
    for k in range(1, N + 1):
        values = [1 - comb(N - c, k) / comb(N, k) for c in counts]
        out.append(bootstrap_ci(values, level=run.level, n_boot=run.n_boot, seed=0))
    return out


def test_curves_per_arm(run):
    curves = pass_at_k_curves(run, "embedded:arithmetic")
    assert _labels(curves) == {
        "base": ["starting model", "after RL"],  # no SFT
        "sft": ["starting model", "after SFT", "after RL"],
        "eksft": ["starting model", "after SFT"],  # in progress: no after_rl evaluation yet
    }
    assert list(curves) == run.arms
    sft = {c.label: c for c in curves["sft"]}
    assert sft["after SFT"].point == "after_sft" and sft["after RL"].point == "after_rl"
    assert sft["starting model"].point == "before_sft"


@pytest.mark.parametrize("arm, label, counts", [
    ("sft", "after SFT", SFT_AFTER_SFT_ARITHMETIC),
    ("base", "starting model", BEFORE_ARITHMETIC),
])
def test_curve_numbers_match_binomials_and_bootstrap(run, arm, label, counts):
    curve = next(c for c in pass_at_k_curves(run, "embedded:arithmetic")[arm] if c.label == label)
    assert curve.ks == [1, 2, 3, 4] and curve.num_problems == len(counts)
    expected = _expected(counts, run)
    assert curve.estimate == pytest.approx([e for e, _, _ in expected], abs=1e-12)
    assert curve.low == pytest.approx([lo for _, lo, _ in expected], abs=1e-12)
    assert curve.high == pytest.approx([hi for _, _, hi in expected], abs=1e-12)
    # by hand: pass@1 is the share of correct samples, pass@n the share of problems solved at least once
    assert curve.estimate[0] == pytest.approx(sum(counts) / (N * len(counts)))
    assert curve.estimate[-1] == pytest.approx(sum(c > 0 for c in counts) / len(counts))


def test_curves_are_fractions_non_decreasing_in_k(run):
    for benchmark in run.benchmarks:
        for arm, curves in pass_at_k_curves(run, benchmark).items():
            for c in curves:
                assert all(0.0 <= lo <= e <= hi <= 1.0 for lo, e, hi in zip(c.low, c.estimate, c.high)), (arm, c)
                assert all(a <= b + 1e-12 for a, b in zip(c.estimate, c.estimate[1:])), (arm, c.label)


def test_write_plots_writes_one_curve_png_per_benchmark(run, tmp_path):
    plots = write_plots(run, tmp_path)
    expected = {"pass_at_k_curves:embedded:arithmetic": tmp_path / "pass_at_k_curves_embedded_arithmetic.png",
                "pass_at_k_curves:gsm8k": tmp_path / "pass_at_k_curves_gsm8k.png"}
    for key, path in expected.items():
        assert plots[key] == path
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 10_000, key


def test_record_without_samples_is_left_out(tmp_path):
    run_dir = tmp_path / "run_small"
    shutil.copytree(FIXTURE, run_dir)
    f = run_dir / "sft" / "eval" / "after_rl" / "embedded_arithmetic.json"
    rec = json.loads(f.read_text())
    del rec["samples"]
    f.write_text(json.dumps(rec))
    run = load_run(run_dir)
    labels = _labels(pass_at_k_curves(run, "embedded:arithmetic"))
    assert labels["sft"] == ["starting model", "after SFT"]
    assert _labels(pass_at_k_curves(run, "gsm8k"))["sft"] == ["starting model", "after SFT", "after RL"]
    path = plot_pass_at_k_curves(run, "embedded:arithmetic", tmp_path / "curves.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_no_data_yet(tmp_path):
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    run = load_run(run_dir)
    assert pass_at_k_curves(run, "gsm8k") == {}
    path = plot_pass_at_k_curves(run, "gsm8k", tmp_path / "curves.png")
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
