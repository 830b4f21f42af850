"""Evaluation: benchmark registry and loading (offline), EvalConfig, metric aggregation, and one end-to-end run."""

import argparse
import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from eksft.data import DataError
from eksft.eval import RESULT_KEYS, EvalConfig, evaluate, load_benchmark, summarize
from eksft.eval.runner import SAMPLE_KEYS, distinct_answers
from eksft.eval.benchmarks import EMBEDDED_DEFAULT_SIZE, EMBEDDED_EVAL_SEED, normalize_gsm8k
from eksft.eval.cli import add_eval_parser, eval_config_from_args, model_basename

HUB_ROWS = Path(__file__).parent / "fixtures" / "hub_rows"


class _FakeHub:
    """Stands in for ``datasets.load_dataset``: returns rows shaped like the real dataset and records the call."""

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def __call__(self, path, name=None, split=None, **kwargs):
        import datasets

        self.calls.append((path, name, split))
        return datasets.Dataset.from_list([dict(r) for r in self.rows])  # what the hub gives: a Dataset


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    def install(rows):
        hub = _FakeHub(rows)
        monkeypatch.setattr(datasets, "load_dataset", hub)
        return hub

    return install


# ----------------------------------------------------------------------------- registry field mappings


def published_rows(file: str) -> list[dict]:
    """The first 50 rows of a published test set, as the hub serves them (tests/fixtures/hub_rows/README.md)."""
    return [json.loads(line) for line in (HUB_ROWS / file).read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name,file,problem_field,hub_call,known_answers", [
    ("math500", "math500_test.jsonl", "problem", ("HuggingFaceH4/MATH-500", None, "test"),
     {1: "\\left( 3, \\frac{\\pi}{2} \\right)", 5: "\\text{Evelyn}", 26: "1,-2", 45: "1.25"}),
    ("gsm8k", "gsm8k_test.jsonl", "question", ("openai/gsm8k", "main", "test"),
     {1: "18", 3: "70000", 18: "57500", 50: "30"}),
])
def test_published_rows_through_the_hub_mapping(fake_hub, name, file, problem_field, hub_call, known_answers):
    rows = published_rows(file)
    hub = fake_hub(rows)
    out = load_benchmark(name)
    assert hub.calls == [hub_call]
    assert len(out) == len(rows) == 50
    assert {i: out[i - 1]["answer"] for i in known_answers} == known_answers  # read off the rows by hand
    assert [r["problem"] for r in out] == [r[problem_field] for r in rows]
    assert all(r["prompt"][-1]["content"].startswith(r["problem"] + "\n") for r in out)


def test_gsm8k_mapping_takes_the_number_after_hashes_without_commas(fake_hub):
    hub = fake_hub([
        {"question": "How many apples?", "answer": "She has 1000 + 234 = <<1000+234=1234>>1,234 apples.\n#### 1,234"},
        {"question": "How many pears?", "answer": "2 + 3 = 5\n#### 5"},
        {"question": "Third?", "answer": "#### 7"},
    ])
    rows = load_benchmark("gsm8k", num_problems=2)
    assert hub.calls == [("openai/gsm8k", "main", "test")]
    assert [r["answer"] for r in rows] == ["1234", "5"]
    assert rows[0]["problem"] == "How many apples?"
    assert rows[0]["prompt"] == [{"role": "user", "content": "How many apples?\nPut your final answer within \\boxed{}."}]
    assert normalize_gsm8k("x #### 12,345,678 ") == "12345678"


def test_olympiadbench_mapping_takes_the_first_list_answer_without_dollars(fake_hub):
    hub = fake_hub([{"id": 1606, "question": "Find x.", "solution": ["..."], "final_answer": ["$\\frac{1}{2}$", "$0.5$"],
                     "is_multiple_answer": False, "unit": None}])
    rows = load_benchmark("olympiadbench")
    assert hub.calls == [("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train")]
    assert rows[0]["answer"] == "\\frac{1}{2}" and rows[0]["problem"] == "Find x."


def test_math500_amc23_minerva_aime_mappings(fake_hub):
    fake_hub([{"problem": "Convert (0,3).", "solution": "... \\boxed{(3, \\frac{\\pi}{2})}",
               "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2}])
    assert load_benchmark("math500")[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    fake_hub([{"id": 0, "question": "AMC problem", "answer": 27.0, "url": "u"}])
    assert load_benchmark("amc23")[0]["answer"] == "27"
    fake_hub([{"question": "Minerva problem", "answer": "2.5e-3"}])
    assert load_benchmark("minerva")[0]["answer"] == "2.5e-3"
    hub = fake_hub([{"id": 60, "problem": "AIME problem", "solution": "...", "answer": "204", "url": "u", "year": "2024"}])
    assert load_benchmark("aime24")[0]["answer"] == "204"
    assert hub.calls == [("HuggingFaceH4/aime_2024", None, "train")]


def test_hub_row_missing_the_mapped_field_names_it(fake_hub):
    fake_hub([{"problem": "no question field", "answer": "#### 3"}])
    with pytest.raises(DataError, match="gsm8k.*missing field 'question'"):
        load_benchmark("gsm8k")


def test_hub_failure_names_benchmark_and_hub_id(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"benchmark 'aime25'.*yentinglin/aime_2025.*Couldn't reach"):
        load_benchmark("aime25")


# ----------------------------------------------------------------------------- local files, embedded, names


def test_local_gsm8k_shaped_jsonl(tmp_path):
    path = tmp_path / "gsm_like.jsonl"
    rows = [{"question": f"Q{i}?", "answer": f"Work.\n#### {i},00{i}"} for i in range(1, 5)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    class Data:
        system_prompt = "You are a careful solver."
        instruction = "Answer in a box."

    out = load_benchmark(str(path), num_problems=3, data_cfg=Data())
    assert [r["answer"] for r in out] == ["1001", "2002", "3003"]
    assert out[0]["prompt"] == [{"role": "system", "content": "You are a careful solver."},
                                {"role": "user", "content": "Q1?\nAnswer in a box."}]


def test_local_json_with_problem_and_final_answer_list(tmp_path):
    path = tmp_path / "olymp.json"
    path.write_text(json.dumps([{"problem": "P1", "final_answer": ["$x=2$"]}, {"problem": "P2", "final_answer": "$7$"},
                                {"question": "P3", "answer": 4.0}]))
    assert [r["answer"] for r in load_benchmark(str(path))] == ["x=2", "7", "4"]


def test_local_file_problems(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "no problem field", "answer": "1"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: cannot find the problem and answer"):
        load_benchmark(str(bad))
    with pytest.raises(DataError, match="file not found"):
        load_benchmark(str(tmp_path / "missing.parquet"))


def test_embedded_benchmark_uses_held_out_seed_and_default_size():
    from eksft.data import read_rows

    rows = load_benchmark("embedded:arithmetic")
    assert len(rows) == EMBEDDED_DEFAULT_SIZE
    assert all(r["answer"] and r["prompt"][-1]["content"].endswith("\\boxed{}.") for r in rows)
    def problems(seed):
        return [r.data["problem"] for r in read_rows("embedded:arithmetic", num_examples=EMBEDDED_DEFAULT_SIZE, seed=seed)]

    assert [r["problem"] for r in rows] == problems(EMBEDDED_EVAL_SEED)
    assert problems(EMBEDDED_EVAL_SEED) != problems(0) and problems(EMBEDDED_EVAL_SEED) != problems(1)  # SFT / RL defaults
    assert len(load_benchmark("embedded:arithmetic", num_problems=5)) == 5


def test_unknown_benchmark_names_list_the_allowed_ones():
    with pytest.raises(DataError, match=r"unknown benchmark 'mathh500' \(allowed: math500, aime24.*embedded:arithmetic"):
        load_benchmark("mathh500")
    with pytest.raises(DataError, match=r"unknown embedded benchmark 'embedded:algebra'"):
        load_benchmark("embedded:algebra")


def test_model_basename():
    assert model_basename("embedded:smollm2-135m-instruct") == "embedded_smollm2-135m-instruct"
    assert model_basename("Qwen/Qwen2.5-Math-1.5B") == "Qwen2.5-Math-1.5B"
    assert model_basename("runs/r/eksft/sft/checkpoint") == "sft-checkpoint"


# ----------------------------------------------------------------------------- EvalConfig


def test_eval_config_defaults_and_errors_name_the_field():
    cfg = EvalConfig()
    assert cfg.benchmarks == ["embedded:arithmetic"] and cfg.n == 8 and cfg.temperature == 1.0
    assert cfg.every_rl_steps == 0 and cfg.num_problems is None and cfg.answer_fallback == "none"
    EvalConfig(benchmarks=["math500", "embedded:gsm", "data/x.parquet"], n=1, temperature=0)
    cases = [({"n": 0}, "n"), ({"temperature": -1}, "temperature"), ({"top_p": 1.5}, "top_p"),
             ({"max_new_tokens": 0}, "max_new_tokens"), ({"num_problems": 0}, "num_problems"),
             ({"every_rl_steps": -1}, "every_rl_steps"), ({"reward_timeout_s": 0}, "reward_timeout_s"),
             ({"benchmarks": ["mat500"]}, "benchmarks"), ({"benchmarks": []}, "benchmarks"),
             ({"samples": 4}, "samples"), ({"answer_fallback": "first_number"}, "answer_fallback")]
    for kwargs, field in cases:
        with pytest.raises(ValidationError) as err:
            EvalConfig(**kwargs)
        assert err.value.errors()[0]["loc"][0] == field, (kwargs, err.value)
    with pytest.raises(ValidationError, match=r"allowed: math500"):
        EvalConfig(benchmarks=["mat500"])


# ----------------------------------------------------------------------------- aggregation (pure)


def test_summarize_against_hand_computed_values():
    # 4 problems x n=4 samples. Correct counts: A=3, B=0, C=3, D=1.
    scores = [[0, 1, 1, 1], [0.0, 0.0, 0.0, 0.0], [True, True, True, False], [1.0, 0.1, 0, 0]]  # 0.1: format bonus only
    extracted = [["7", "5", "5", "5"], [None, "2", None, "2"], ["$4$", " 4", "4", "9"], ["1", "2", "3", None]]
    logprobs = [[[-0.5, -1.5]] * 4, [[-3.0]] * 4, [[-0.5, -1.5]] * 4, [[-0.5, -1.5]] * 4]
    truncated = [[False] * 4, [False] * 4, [False] * 4, [True, False, False, False]]
    m = summarize(scores, extracted, logprobs, 4, truncated_per_problem=truncated)
    assert m["n"] == 4 and m["num_problems"] == 4
    assert m["avg@n"] == pytest.approx(7 / 16)
    # pass@k per problem: A (c=3): .75, 1, 1, 1; B: 0; C (c=3) like A; D (c=1): 1/4, 1 - 3/6, 1 - 1/4, 1.
    assert list(m["pass@k"]) == ["1", "2", "3", "4"]
    assert m["pass@k"]["1"] == pytest.approx(0.4375)
    assert m["pass@k"]["2"] == pytest.approx(0.625)
    assert m["pass@k"]["3"] == pytest.approx(0.6875)
    assert m["pass@k"]["4"] == pytest.approx(0.75)
    # maj@k: A: "7" wrong, tie 7/5 -> first (7) wrong, 3x "5" right; B: never; C: "4" (=$4$, " 4") right; D: "1" right.
    assert m["maj@k"] == pytest.approx({"1": 0.5, "2": 0.5, "4": 0.75})
    assert m["entropy_mean"] == pytest.approx(36 / 28)  # -(12 * -2.0 + 4 * -3.0) / (12 * 2 + 4 * 1)
    assert m["response_length_mean"] == pytest.approx(28 / 16)
    assert m["truncation_rate"] == pytest.approx(1 / 16)
    # distinct answers: A {7, 5} = 2, B {2} = 1 (None is no answer), C {4, 9} = 2 ("$4$" is "4"), D {1, 2, 3} = 3
    assert m["distinct_answers_mean"] == pytest.approx((2 + 1 + 2 + 3) / 4)
    assert m["coverage"] == pytest.approx(3 / 4) == m["pass@k"]["4"]  # B is never solved


def test_summarize_edge_cases():
    m = summarize([[1, 0, 0, 0, 0, 0]], [["3", "3", "4", "4", "4", None]], None, 6)
    assert list(m["pass@k"]) == [str(k) for k in range(1, 7)]
    assert m["pass@k"]["6"] == 1.0 and m["pass@k"]["1"] == pytest.approx(1 / 6)
    assert m["maj@k"] == {"1": 1.0, "2": 1.0, "4": 1.0, "6": 0.0}
    assert m["entropy_mean"] is None and m["truncation_rate"] == 0.0
    assert m["distinct_answers_mean"] == 2 and m["coverage"] == 1.0
    assert summarize([[0, 0]], [[None, None]], None, 2)["distinct_answers_mean"] == 0
    with pytest.raises(ValueError, match="expected n=2"):
        summarize([[1, 0, 1]], [["1", "2", "3"]], None, 2)


# ----------------------------------------------------------------------------- CLI (no engine)


def test_cli_parser_and_table(monkeypatch, tmp_path, capsys):
    import eksft.eval.runner as runner
    from eksft.eval.cli import cmd_eval

    parser = argparse.ArgumentParser(prog="eksft")
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--model", "tiny:qwen2", "--benchmarks", "embedded:gsm, math500", "--n", "16",
                              "--temperature", "0.6", "--max-tokens", "64", "--num-problems", "10", "--engine", "hf",
                              "--answer-fallback", "last_number", "--out", str(tmp_path)])
    cfg = eval_config_from_args(args)
    assert cfg.benchmarks == ["embedded:gsm", "math500"] and cfg.n == 16 and cfg.temperature == 0.6
    assert cfg.max_new_tokens == 64 and cfg.num_problems == 10 and cfg.top_p == 1.0
    assert cfg.answer_fallback == "last_number"

    seen = {}

    def fake_evaluate(model_dir, benchmarks, cfg, rollout_cfg=None, data_cfg=None, out_dir=None, **kw):
        seen.update(benchmarks=benchmarks, engine=rollout_cfg.engine, out=out_dir, instruction=data_cfg.instruction)
        metrics = summarize([[1] * 16], [["3"] * 16], [[[-1.0]] * 16], 16)
        return {b: {"benchmark": b, "model": kw["model_name"], "point": None, **metrics, "wall_s": 0.5, "samples": []}
                for b in benchmarks}

    monkeypatch.setattr(runner, "evaluate", fake_evaluate)
    assert cmd_eval(args) == 0
    assert seen["benchmarks"] == ["embedded:gsm", "math500"] and seen["engine"] == "hf"
    assert str(seen["out"]) == str(tmp_path) and "boxed" in seen["instruction"]
    out = capsys.readouterr().out
    assert "embedded:gsm" in out and "pass@n" in out and "1.000" in out

    bad = parser.parse_args(["eval", "--model", "tiny:qwen2", "--n", "0"])
    assert cmd_eval(bad) == 2
    assert "eval: n: Input should be greater than or equal to 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end (HF engine, tiny model)


def test_evaluate_end_to_end_with_hf_engine(tiny_qwen2_dir, tmp_path):
    from rl.rollout import make_engine

    cfg = EvalConfig(benchmarks=["embedded:arithmetic"], n=4, max_new_tokens=8, num_problems=3)
    engine = make_engine("hf", tiny_qwen2_dir)
    out = tmp_path / "eval" / "sft_end"
    results = evaluate(tiny_qwen2_dir, cfg.benchmarks, cfg, engine=engine, out_dir=out, point="sft_end",
                       model_name="tiny:qwen2", progress=False)
    again = evaluate(tiny_qwen2_dir, cfg.benchmarks, cfg, engine=engine, progress=False)  # engine still alive
    r = results["embedded:arithmetic"]
    assert tuple(r) == RESULT_KEYS
    assert r["n"] == 4 and r["num_problems"] == 3 and r["point"] == "sft_end" and r["model"] == "tiny:qwen2"
    passes = [r["pass@k"][str(k)] for k in range(1, 5)]
    assert all(a <= b + 1e-12 for a, b in zip(passes, passes[1:]))
    assert r["pass@k"]["4"] >= r["avg@n"] - 1e-12 and r["pass@k"]["1"] == pytest.approx(r["avg@n"])
    assert set(r["maj@k"]) == {"1", "2", "4"}
    assert r["entropy_mean"] is not None and math.isfinite(r["entropy_mean"]) and r["entropy_mean"] > 0
    assert 0 < r["response_length_mean"] <= 8 and 0 <= r["truncation_rate"] <= 1 and r["wall_s"] > 0
    assert len(r["samples"]) == 3
    for s in r["samples"]:
        assert tuple(s) == SAMPLE_KEYS
        assert len(s["completions"]) == len(s["scores"]) == len(s["extracted"]) == len(s["lengths"]) == 4
        assert all(0 < x <= 8 for x in s["lengths"]) and all(isinstance(t, bool) for t in s["truncated"])
        assert s["entropy"] > 0 and s["distinct_answers"] == distinct_answers(s["extracted"])
    # per-problem values are what the benchmark means average
    lengths = [x for s in r["samples"] for x in s["lengths"]]
    assert r["response_length_mean"] == pytest.approx(sum(lengths) / len(lengths))
    assert r["distinct_answers_mean"] == pytest.approx(sum(s["distinct_answers"] for s in r["samples"]) / 3)
    assert r["coverage"] == pytest.approx(sum(any(x >= 1 for x in s["scores"]) for s in r["samples"]) / 3)
    # Deterministic seeds: the same completions again.
    assert [s["completions"] for s in again["embedded:arithmetic"]["samples"]] == [s["completions"] for s in r["samples"]]

    saved = json.loads((out / "embedded_arithmetic.json").read_text())
    assert tuple(saved) == RESULT_KEYS and saved["pass@k"] == r["pass@k"] and saved["samples"] == r["samples"]


def test_a_relative_local_benchmark_is_written_under_its_stem(tiny_qwen2_dir, tmp_path, monkeypatch, capsys):
    """`eksft eval --benchmarks ../data/gsm8k_test.jsonl` writes gsm8k_test.json (it wrote .._data_gsm8k_test.jsonl.json,
    which `ls` does not show), and the report finds it under its benchmark name."""
    from eksft.cli import main
    from eksft.report.data import load_run

    (tmp_path / "data").mkdir()
    rows = [{"question": f"What is {i} + 1?", "answer": f"... #### {i + 1}"} for i in range(2)]
    (tmp_path / "data" / "gsm8k_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    out = tmp_path / "run" / "arm" / "eval" / "after_rl"
    assert main(["eval", "--model", tiny_qwen2_dir, "--benchmarks", "../data/gsm8k_test.jsonl", "--n", "1",
                 "--max-tokens", "4", "--engine", "hf", "--out", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gsm8k_test.json"]
    saved = json.loads((out / "gsm8k_test.json").read_text())
    assert saved["benchmark"] == "../data/gsm8k_test.jsonl" and [s["answer"] for s in saved["samples"]] == ["1", "2"]
    assert load_run(tmp_path / "run").evals["arm"]["after_rl"].keys() == {"../data/gsm8k_test.jsonl"}
    capsys.readouterr()


def test_two_local_benchmarks_with_one_stem_are_refused():
    with pytest.raises(ValidationError, match=r"benchmarks 'a/test\.jsonl' and 'b/test\.parquet' would both write "
                                              r"test\.json"):
        EvalConfig(benchmarks=["a/test.jsonl", "b/test.parquet"])
    with pytest.raises(ValueError, match=r"'gsm8k' and 'data/gsm8k\.jsonl' would both write gsm8k\.json"):
        evaluate("unused", ["gsm8k", "data/gsm8k.jsonl"], EvalConfig())


def test_problem_values_average_to_the_benchmark_metrics():
    """The per-problem values the report bootstraps have the result's own metrics as their means."""
    from eksft.eval.runner import problem_values

    scores = [[0, 1, 1, 1], [0.0, 0.0, 0.0, 0.0], [True, True, True, False], [1.0, 0.1, 0, 0]]
    extracted = [["7", "5", "5", "5"], [None, "2", None, "2"], ["$4$", " 4", "4", "9"], ["1", "2", "3", None]]
    result = {**summarize(scores, extracted, None, 4),
              "samples": [{"problem": f"p{i}", "scores": s, "extracted": e} for i, (s, e) in enumerate(zip(scores, extracted))]}
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert problem_values(result, "avg@n") == [0.75, 0.0, 0.75, 0.25]
    assert mean(problem_values(result, "avg@n")) == pytest.approx(result["avg@n"])
    for k in range(1, 5):
        assert mean(problem_values(result, f"pass@{k}")) == pytest.approx(result["pass@k"][str(k)])
    for k in (1, 2, 4):
        assert mean(problem_values(result, f"maj@{k}")) == pytest.approx(result["maj@k"][str(k)])
    assert problem_values(result, "coverage") == [1.0, 0.0, 1.0, 1.0]
    # results written before distinct_answers was stored: counted from the extracted answers
    assert problem_values(result, "distinct_answers") == [2.0, 1.0, 2.0, 3.0]
    assert problem_values(result, "entropy") is None  # no per-problem entropy stored
    assert problem_values({**result, "samples": []}, "avg@n") is None
    with pytest.raises(ValueError, match="unknown metric 'pass@5'"):
        problem_values(result, "pass@5")
