"""benchmarks/gpu_fsdp_update.py (prepared for a GPU machine) runs on CPU with --tiny, through the package
imports and through the module-file path the GPU image (no pydantic) takes; it imports neither Ray nor vLLM.

No timing assertions: a smoke run, so that the script still matches the worker's interface when a GPU is lent.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_fsdp_update.py"


@pytest.mark.parametrize("extra", [[], ["--module-files"]], ids=["package", "module-files"])
def test_gpu_fsdp_update_tiny_on_cpu(tmp_path, extra):
    out = tmp_path / "gpu_fsdp_update.json"
    cmd = [sys.executable, str(BENCH), "--tiny", "--device", "cpu", "--steps", "1", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and len(result["update_s"]) == 1 and result["update_s"][0] > 0
    assert not result["ray_imported"] and not result["vllm_imported"]
    assert result["last_metrics"]["num_seqs"] == 8 and result["last_metrics"]["grad_norm"] > 0
    # both steps timed again with the one-rank unsharded accumulation off
    assert len(result["accumulation_off"]["step_s"]) == 1 and result["accumulation_off"]["step_s"][0] > 0
    if extra:
        assert result["imports"].startswith("module files") and not result["pydantic_imported"]
    else:  # the cold-start step: eksft on a fresh worker with its sharded reference
        sft = result["sft"]
        assert len(sft["step_s"]) == 1 and sft["step_s"][0] > 0 and sft["last_metrics"]["grad_norm"] > 0
        assert sft["last_metrics"]["kl_mean"] > 0 and 0 < sft["last_metrics"]["removed_fraction"] < 1  # after the warm-up step
        assert sft["accumulation_off"]["step_s"][0] > 0
    summary = out.with_suffix(".txt").read_text()
    assert summary.startswith("gpu_fsdp_update:") and "accumulation off:" in summary
