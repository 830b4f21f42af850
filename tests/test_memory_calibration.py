"""The memory estimates against measured peaks on CPU with the embedded model, within 25%: one cold-start step,
one GRPO update of the trainer worker, one vLLM engine start + generation (benchmarks/memory_peaks.py, each in a
fresh process; the numbers are in docs/memory.md, Estimates against measured peaks (CPU))."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("memory_peaks", ROOT / "benchmarks" / "memory_peaks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NAMES = ("sft", "grpo", "engine")


@pytest.fixture(scope="module")
def children(embedded_dir):
    """The three measurements started at once (one thread each; a peak is its own process's): the module's wall
    time is the slowest one's, not the sum."""
    bench = _bench()
    started = {name: bench.start_child(name) for name in NAMES}
    yield bench, started
    for child in started.values():
        if child.poll() is None:
            child.kill()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_estimate_within_25_percent_of_the_measured_peak(name, children):
    bench, started = children
    result = bench.child_result(name, started[name], timeout=600)
    print(f"[memory] {name}: estimate {result['estimate_bytes'] / 2**30:.3f} GiB, measured "
          f"{result['measured_bytes'] / 2**30:.3f} GiB, ratio {result['ratio']:.2f} ({result['what']})")
    assert abs(result["ratio"] - 1) <= bench.TOLERANCE, result
