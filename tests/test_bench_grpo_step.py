"""benchmarks/grpo_step.py runs end to end on a tiny model: every system and the update profile.

No timing assertions. A smoke run, because the benchmark reaches into the trainer's building blocks
(the profile times `token_statistics` where `completion_logprobs` looks it up) and broke once unnoticed.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "grpo_step.py"


@pytest.mark.slow
def test_grpo_step_smoke(tmp_path, tiny_qwen2_dir):
    out = tmp_path / "grpo_step.json"
    cmd = [sys.executable, str(BENCH), "--model", "tiny:qwen2", "--prompts", "2", "--group", "2",
           "--max-new-tokens", "8", "--steps", "1", "--warmup", "0", "--systems", "ours,ours-padded,engine", "--engine-reps", "1",
           "--profile-micro", "2", "--profile-replicas", "--packing-reps", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    text = json.dumps(result)
    assert "failed" not in proc.stdout and '"error"' not in text
    assert (tmp_path / "grpo_step.md").is_file()
    stats = [v for v in _find(result, "token_statistics_s")]
    assert stats and all(v > 0 for v in stats)  # the profile timed the statistics of every variant
    packing = next(_find(result, "update_by_packing"))
    # 2 prompts x 2 samples: the packed forwards compute each prompt once per group instead of once per sequence
    assert 0 < packing["shared_prompt"]["positions"] < packing["off"]["positions"]
    rows = {r["system"]: r for r in result["rows"]}
    assert rows["ours"]["settings"]["packing_resolved"] == "shared_prompt"
    assert rows["ours-padded"]["settings"]["packing_resolved"] == "off"


def _find(obj, key):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from ([v] if k == key else _find(v, key))
    elif isinstance(obj, list):
        for x in obj:
            yield from _find(x, key)
