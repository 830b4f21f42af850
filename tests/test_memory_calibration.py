"""The memory estimates against measured peaks on CPU with the embedded model, within 25%: one cold-start step,
one GRPO update of the trainer worker, one vLLM engine start + generation (benchmarks/memory_peaks.py, each in a
fresh process; the numbers are in docs/memory.md, Estimates against measured peaks (CPU))."""

import pytest

NAMES = ("sft", "grpo", "engine")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_estimate_within_25_percent_of_the_measured_peak(name, embedded_dir, load_benchmark):
    """One measurement at a time, each in a fresh process (a peak is its own process's). Not all three at once: with
    the other pytest-xdist process's test beside them, the machine ran short of memory, and the kernel evicting pages
    lowered a measured peak (grpo 0.72 of its estimate; 0.90 alone) or a child failed. The other process can still
    run short (sft 0.72 beside it, 0.90 alone): a measurement during which the kernel reclaimed pages is repeated,
    up to three times."""
    bench = load_benchmark("memory_peaks")
    for _ in range(3):
        result = bench.run_child(name, timeout=600)
        print(f"[memory] {name}: estimate {result['estimate_bytes'] / 2**30:.3f} GiB, measured "
              f"{result['measured_bytes'] / 2**30:.3f} GiB, ratio {result['ratio']:.2f}, pages reclaimed meanwhile "
              f"{result['reclaimed_pages']} ({result['what']})")
        if result["reclaimed_pages"] == 0:
            break
    assert abs(result["ratio"] - 1) <= bench.TOLERANCE, result
