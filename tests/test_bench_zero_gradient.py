"""benchmarks/zero_gradient.py: both settings run the worker's update for each share of zero-variance groups, and
the record says how many backwards each one skipped.

No timing assertions: the numbers come from the benchmark itself, on the embedded model.
"""

import json


def test_zero_gradient_benchmark_records_both_settings_per_share(tmp_path, tiny_qwen2_dir, load_benchmark):
    bench = load_benchmark("zero_gradient")
    out = tmp_path / "z.json"
    bench.main(["--model", "tiny:qwen2", "--groups", "4", "--group", "2", "--prompt-tokens", "6", "--min-tokens", "2",
                "--max-tokens", "9", "--shares", "0,0.5,1", "--reps", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    rows = record["by_zero_variance_share"]
    assert list(rows) == ["0.0", "0.5", "1.0"]
    for share, row in rows.items():
        assert row["backward_always"]["skipped_backward"] == [0.0]
        assert row["skip_zero_gradient"]["skipped_backward"] == [float(share)]  # 0, 2 and 4 of 4 micro-batches
        assert all(s > 0 for name in ("backward_always", "skip_zero_gradient") for s in row[name]["seconds"])
    assert record["hardware"]["device"] == "cpu"
    assert "| 50% |" in out.with_suffix(".md").read_text()
