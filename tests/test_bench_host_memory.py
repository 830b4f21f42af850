"""benchmarks/host_memory.py: both malloc settings run the worker's update, and the record has their page faults; with
``--malloc LIBRARY`` a process per malloc, each recording the library it ran on.

No timing assertions: the numbers come from the benchmark itself, on the embedded model.
"""

import json
import sys
from pathlib import Path

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


STAND_IN = Path("/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0")  # glibc >= 2.34's own preloadable malloc


@pytest.mark.skipif(not STAND_IN.is_file(), reason=f"{STAND_IN}: glibc >= 2.34, Debian's layout")
def test_host_memory_malloc_mode_runs_a_process_per_malloc_and_records_what_each_ran_on(tmp_path, tiny_qwen2_dir,
                                                                                        load_benchmark):
    """``--malloc LIBRARY``: a process on glibc's malloc and one with LIBRARY preloaded (glibc's debugging malloc
    stands in for tcmalloc, which is not installed here), each recording the library mapped into it."""
    bench = load_benchmark("host_memory")
    out = tmp_path / "m.json"
    bench.main(["--malloc", str(STAND_IN), "--rounds", "1", "--model", "tiny:qwen2", "--groups", "2", "--group", "2",
                "--prompt-tokens", "6", "--min-tokens", "2", "--max-tokens", "9", "--reps", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["malloc"]["glibc"]["malloc"] == ["glibc"]
    assert record["malloc"]["preloaded"]["malloc"] == [STAND_IN.name]  # LD_PRELOAD reached the child
    for setting in record["malloc"].values():
        assert len(setting["seconds"]) == len(setting["page_faults"]) == len(setting["rss_after_mb"]) == 1
        assert setting["seconds"][0] > 0 and setting["peak_rss_mb"][0] >= setting["rss_after_mb"][0] > 0
    assert record["ratios"]["preloaded_over_glibc_time"] > 0
    assert f"| preloaded ({STAND_IN.name}) |" in out.with_suffix(".md").read_text()


def test_host_memory_malloc_mode_names_a_missing_library(tmp_path, load_benchmark):
    bench = load_benchmark("host_memory")
    with pytest.raises(SystemExit, match="--malloc .*missing.so: no such file"):
        bench.main(["--malloc", str(tmp_path / "missing.so"), "--out", str(tmp_path / "m.json")])
