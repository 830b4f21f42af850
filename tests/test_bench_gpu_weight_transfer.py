"""benchmarks/gpu_weight_transfer.py (prepared for a GPU machine) runs end to end on CPU with --tiny: two vLLM-CPU
engine actors, the trainer's weights sent through vLLM's weight-transfer API (``cpu_gloo``, the code the GPU
backends share: RayEngine, TransferTarget, WeightStream, trainer_transfer), and the engines then serve them.

No timing assertions: a smoke run, so that the script still matches the rollout stack's interface when a GPU is lent.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_weight_transfer.py"


def expected_bytes(model_dir: Path, itemsize: int) -> int:
    """One copy of the saved model's weights, the tied head once, at ``itemsize`` bytes per element: read from
    the safetensors headers and the config, not from the script."""
    from safetensors import safe_open

    tied = json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings", False)
    numel = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                if tied and name == "lm_head.weight":
                    continue
                count = 1
                for d in f.get_slice(name).get_shape():
                    count *= d
                numel += count
    return numel * itemsize


@pytest.mark.slow
def test_gpu_weight_transfer_tiny_on_cpu(tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("ray")
    out, model_dir = tmp_path / "gpu_weight_transfer.json", tmp_path / "model"
    cmd = [sys.executable, str(BENCH), "--tiny", "--repeats", "2", "--model-dir", str(model_dir),
           "--quiet-engines", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["backends"]) == ["cpu_gloo"] and result["engines"] == 2
    gloo = result["backends"]["cpu_gloo"]
    assert gloo["skipped"] is None and gloo["error"] is None and "shutdown_error" not in gloo, gloo
    assert gloo["trainer_engine"] == "GlooTrainerWeightTransfer"  # vLLM's factory returned the project's backend
    assert len(gloo["seconds"]) == 2 and all(s > 0 for s in gloo["seconds"])
    assert gloo["engine_dtype"] == "float32"
    nbytes = expected_bytes(model_dir, itemsize=4)
    assert gloo["bytes"] == nbytes and gloo["reported_bytes"] == nbytes, (gloo["bytes"], gloo["reported_bytes"], nbytes)
    assert gloo["gb_per_s"] > 0
    # every engine serves the perturbed weights of the last send, and the check could have failed
    assert len(gloo["gaps"]) == 2 and all(n > 0 for n in gloo["scored_tokens"])
    assert all(g < 1e-3 for g in gloo["gaps"]), gloo["gaps"]
    assert all(s > 10 * max(gloo["gaps"]) and s > 1e-3 for s in gloo["stale_gaps"]), gloo["stale_gaps"]
    assert out.with_suffix(".txt").read_text().startswith("gpu_weight_transfer:")
