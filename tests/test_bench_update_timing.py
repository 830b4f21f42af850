"""benchmarks/_update_timing.py (the alternation every update benchmark times its settings with) and the
benchmarks built on it that have no other test: segment_attention, token_stats_chunks and one_rank_accumulation.

No timing assertions: the benchmarks run on the tiny model and their records are checked for shape and content.
"""

import json
import statistics

import pytest


def test_alternate_reverses_the_order_every_repetition_and_keeps_every_key(load_benchmark):
    timing = load_benchmark("_update_timing")
    calls = []

    def measure(name):
        calls.append(name)
        return {"seconds": float(len(calls)), "tag": name.upper()}

    out = timing.alternate({"a": 1, "b": 2, "c": 3}, 3, measure)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    # call k (1-based) took k seconds: a ran as calls 1, 6, 7; b as 2, 5, 8; c as 3, 4, 9
    assert out["a"]["seconds"] == [1.0, 6.0, 7.0] and out["a"]["median_s"] == 6.0
    assert out["b"]["seconds"] == [2.0, 5.0, 8.0] and out["b"]["median_s"] == 5.0
    assert out["c"]["seconds"] == [3.0, 4.0, 9.0] and out["c"]["median_s"] == 4.0
    assert out["c"]["tag"] == ["C", "C", "C"]
    even = timing.alternate(["x", "y"], 2, lambda name: {"seconds": {"x": 1.0, "y": 3.0}[name]})
    assert even["x"]["median_s"] == statistics.median([1.0, 1.0]) and even["y"]["seconds"] == [3.0, 3.0]


def test_alternate_module_setting_times_each_value_and_restores_the_constant(load_benchmark):
    import types

    timing = load_benchmark("_update_timing")
    module = types.SimpleNamespace(SETTING="original")
    seen = []
    out = timing.alternate_module_setting(module, "SETTING", {"a": 1, "b": 2}, lambda: seen.append(module.SETTING), 2)
    assert seen == [1, 2, 2, 1]  # the value each call read, repetition 1 reversed
    assert set(out) == {"a", "b"} and all(len(v["seconds"]) == 2 for v in out.values())
    assert module.SETTING == "original"

    def fails():
        raise RuntimeError("step failed")
    with pytest.raises(RuntimeError, match="step failed"):
        timing.alternate_module_setting(module, "SETTING", {"a": 1}, fails, 1)
    assert module.SETTING == "original"  # restored on an error too


def test_synthetic_micro_batches_have_the_asked_shape(load_benchmark):
    import argparse
    import random

    timing = load_benchmark("_update_timing")
    parser = argparse.ArgumentParser()
    timing.add_rollout_arguments(parser)
    args = parser.parse_args(["--groups", "3", "--group", "4", "--prompt-tokens", "5", "--min-tokens", "2",
                              "--max-tokens", "7"])
    batches, tokens = timing.synthetic_micro_batches(args, random.Random(0), vocab_size=11)
    assert len(batches) == 3 and all(len(mb) == 4 for mb in batches)
    for mb in batches:
        assert all(p == mb.prompt_ids[0] and len(p) == 5 for p in mb.prompt_ids)  # one prompt per group
        assert all(2 <= len(c) <= 7 and all(0 <= t < 11 for t in c) for c in mb.completion_ids)
        assert all(-1 <= a <= 1 for a in mb.advantages)
    assert tokens == sum(len(c) for mb in batches for c in mb.completion_ids)


def run_on_the_tiny_model(load_benchmark, name: str, out, *flags: str) -> tuple[dict, str]:
    """``benchmarks/<name>.py`` on tiny:qwen2 with 5-token prompts, one run per setting: its record and table."""
    load_benchmark(name).main(["--model", "tiny:qwen2", "--prompt-tokens", "5", "--min-tokens", "2", "--reps", "1",
                               *flags, "--out", str(out)])
    return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def test_segment_attention_benchmark_records_every_call_cost(tmp_path, tiny_qwen2_dir, load_benchmark):
    record, table = run_on_the_tiny_model(load_benchmark, "segment_attention", tmp_path / "s.json", "--groups", "2",
                                          "--group", "3", "--max-tokens", "40", "--costs", "64", "--no-bf16")
    alone = record["attention_alone"]
    assert set(alone) == {"0", "64", str(record["default_call_pairs"]), "one"}
    # one call per packed row at "one"; at cost 0 a bucket per distinct length, so at least as many calls
    assert alone["one"]["calls"] == 2 and alone["0"]["calls"] >= alone["64"]["calls"] >= alone["one"]["calls"]
    assert alone["0"]["completion_pairs"] <= alone["one"]["completion_pairs"]
    assert set(record["update"]) == {"one", str(record["default_call_pairs"])} and not record["attention_dtype"]["update"]
    assert all(len(v["seconds"]) == 1 and v["seconds"][0] > 0 for v in record["update"].values())
    assert "default / one call" in table


def test_token_stats_chunks_benchmark_records_every_chunk(tmp_path, tiny_qwen2_dir, load_benchmark):
    record, table = run_on_the_tiny_model(load_benchmark, "token_stats_chunks", tmp_path / "t.json", "--groups", "2",
                                          "--group", "2", "--max-tokens", "9", "--positions", "40", "--chunks", "8")
    assert str(record["cpu_default_chunk"]) in record["statistics_alone"] and "8" in record["statistics_alone"]
    assert all(v["median_s"] > 0 for v in record["statistics_alone"].values())
    assert set(record["update"]) == {"cpu", "accelerator"}
    assert record["update"]["cpu"]["chunk_positions"] == record["cpu_default_chunk"]
    assert "CPU chunks / largest" in table


def test_segment_attention_benchmark_at_bf16_compares_the_attention_dtypes(tmp_path, tiny_qwen2_dir, load_benchmark):
    record, table = run_on_the_tiny_model(load_benchmark, "segment_attention", tmp_path / "s.json", "--groups", "2",
                                          "--group", "2", "--max-tokens", "20", "--costs", "64", "--bf16")
    assert record["precision"]["trainer"] == "bfloat16"
    assert set(record["attention_dtype"]["alone"]) == set(record["attention_dtype"]["update"]) == {"float32", "bf16"}
    assert record["ratios"]["update_float32_attention_over_bf16"] > 0
    assert "float32 / bf16 attention" in table


def test_one_rank_accumulation_benchmark_times_both_steps_with_the_setting_restored(tmp_path, tiny_qwen2_dir,
                                                                                     load_benchmark):
    import rl.workers.trainer_worker as trainer_worker

    record, table = run_on_the_tiny_model(load_benchmark, "one_rank_accumulation", tmp_path / "a.json", "--groups",
                                          "2", "--group", "2", "--max-tokens", "9", "--sft-micro-batches", "2")
    for part in ("grpo_update", "sft_step"):
        assert set(record[part]) == {"unsharded", "per_micro_batch"}
        assert all(len(v["seconds"]) == 1 and v["seconds"][0] > 0 for v in record[part].values())
        assert record["ratios"][f"{part}_unsharded_over_per_micro_batch"] > 0
        assert record["unsharded_faster_pairs"][part] in (0, 1)
    assert record["sft_tokens"] > 0 and trainer_worker.ONE_RANK_UNSHARDED_ACCUMULATION is True
    assert "cold-start step" in table
