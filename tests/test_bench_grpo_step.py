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


def _row(system, walls, warmup=1, **extra):
    """A child's row as `summarise` makes it: ``walls`` the step times, the first ``warmup`` of them warm-ups."""
    steps = [{"step": i + 1, "warmup": i < warmup, "wall_s": w, "generate": w / 2, "reward": 0.0, "train": w / 2,
              "sync": 0.0, "other": 0.0, "completion_tokens": 100} for i, w in enumerate(walls)]
    return extra.pop("summarise")(system, steps, warmup, extra)


def test_rounds_pool_the_timed_steps_and_keep_each_round(load_benchmark):
    bench = load_benchmark("grpo_step")
    one = _row("ours", [99.0, 10.0, 14.0], summarise=bench.summarise, profile={"x": 1})
    two = _row("ours", [99.0, 12.0, 20.0], summarise=bench.summarise, profile=None)
    failed = {"system": "ours", "status": "failed", "error": "boom"}
    merged = bench.merge_rounds("ours", [one, failed, two])
    # the timed steps of both rounds that ran: 10, 14, 12, 20 (the 99 s warm-ups dropped)
    assert merged["status"] == "ok" and merged["steps"] == 4
    assert merged["step_time_s"] == 13.0 and merged["step_time_s_min"] == 10.0
    assert merged["time_split_s"]["train"] == 6.5 and merged["warmup_steps"] == 1
    assert [r and r["step_time_s"] for r in merged["rounds"]] == [12.0, None, 16.0]
    assert merged["round_errors"] == [{"round": 1, "status": "failed", "error": "boom"}]
    assert merged["profile"] == {"x": 1}  # the first round's
    assert bench.merge_rounds("ours", [one]) is one
    assert bench.merge_rounds("ours", [failed, dict(failed, error="again")]) is failed


def test_rounds_reverse_the_order_and_give_the_ratio_per_round(load_benchmark, monkeypatch):
    """The parent's schedule with the children replaced by a recorder (the children are subprocesses with vLLM and
    TRL; their own run is `test_grpo_step_smoke`): rounds 1 and 3 in the given order, round 2 reversed, the
    once-only engine section last, the profile only in round 1; the ratio to TRL per round."""
    bench = load_benchmark("grpo_step")
    calls = []
    times = {"ours": iter([10.0, 11.0, 9.0]), "trl": iter([40.0, 33.0, 36.0])}

    def child(args, system, extra_argv=()):
        calls.append((system, tuple(extra_argv)))
        if system == "engine":
            return {"system": "engine", "status": "failed", "error": "not run by this test"}
        wall = next(times[system])
        return _row(system, [wall, wall], summarise=bench.summarise)

    monkeypatch.setattr(bench, "run_child", child)
    args = bench.parse_args(["--systems", "ours,engine,trl", "--rounds", "3", "--no-bf16", "--rollout-dtype", "float32"])
    bench._precision.resolve(args)
    result = bench.run_parent(args)
    assert calls == [("ours", ()), ("trl", ()), ("trl", ("--no-profile",)), ("ours", ("--no-profile",)),
                     ("ours", ("--no-profile",)), ("trl", ("--no-profile",)), ("engine", ())]
    assert [r["system"] for r in result["rows"]] == ["ours", "engine", "trl"]
    by_round = result["ratios"]["ours_steps_per_s_over_trl_by_round"]
    assert by_round == [4.0, 3.0, 4.0]  # 40 / 10, 33 / 11, 36 / 9
    assert result["ratios"]["ours_steps_per_s_over_trl"] == 36.0 / 10.0  # pooled medians
    assert "ours: 10.00, 11.00, 9.00" in bench.markdown(result)
