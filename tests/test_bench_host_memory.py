"""benchmarks/host_memory.py: both malloc settings run the worker's update, and the record has their page faults.

No timing assertions: the numbers come from the benchmark itself, on the embedded model.
"""

import json
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_host_memory_benchmark_records_both_settings(tmp_path, tiny_qwen2_dir, load_benchmark):
    bench = load_benchmark("host_memory")
    out = tmp_path / "h.json"
    bench.main(["--model", "tiny:qwen2", "--groups", "2", "--group", "2", "--prompt-tokens", "6", "--min-tokens", "2",
                "--max-tokens", "9", "--reps", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert set(record["updates"]) == {"glibc_default", "heap_reuse"}
    for setting in record["updates"].values():
        assert len(setting["seconds"]) == len(setting["page_faults"]) == 1
        assert setting["seconds"][0] > 0 and setting["page_faults"][0] >= 0
    assert record["settings"]["heap_reuse"]["mmap_threshold"] == 1 << 30 and record["settings"]["glibc_default"]["mmap_threshold"] == 32 << 20
    assert record["hardware"]["device"] == "cpu"
    assert "heap_reuse / glibc_default" in out.with_suffix(".md").read_text()
