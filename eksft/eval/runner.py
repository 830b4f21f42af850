"""Evaluate a model on benchmarks: n samples per problem, math-verify rewards, exploration metrics.

    results = evaluate(model_dir, ["math500", "embedded:gsm"], EvalConfig(n=16), out_dir="runs/x/eval/sft_end")
    results["math500"]["pass@k"]["16"]

Per benchmark (also written to ``out_dir/<eksft.layout.benchmark_filename(name)>``, schema ``RESULT_KEYS``):

  avg@n                 mean accuracy over all n samples of all problems
  pass@k                {"1": ..., ..., "n": ...}: the unbiased estimator 1 - C(n-c, k)/C(n, k), averaged over problems
  maj@k                 {"1", "2", "4", ..., "n"}: majority vote over the extracted answers of the first k samples
  entropy_mean          -mean(log-prob) of the sampled tokens (see ``summarize``)
  distinct_answers_mean distinct final answers per problem (``distinct_answers``), averaged over problems
  coverage              share of problems solved by at least one of the n samples
  response_length_mean  completion tokens per sample
  truncation_rate       share of samples that hit max_new_tokens
  wall_s                generation + reward time of the benchmark
  samples               per problem (``SAMPLE_KEYS``): problem, answer, and per sample its completion, score,
                        extracted answer, length in tokens and truncation; the problem's mean token entropy and
                        number of distinct answers. ``eksft.report`` bootstraps intervals from these.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rl.metrics import maj_at_k, mean_at_n, pass_at_k, power_of_two_ks

from eksft.eval.benchmarks import load_benchmark
from eksft.eval.config import EvalConfig
from eksft.layout import check_distinct_result_files, result_path

RESULT_KEYS = ("benchmark", "model", "point", "n", "num_problems", "avg@n", "pass@k", "maj@k", "entropy_mean",
               "distinct_answers_mean", "coverage", "response_length_mean", "truncation_rate", "wall_s", "samples")
"""Keys of every result dict and JSON file, in order (the report generator reads exactly these)."""

SAMPLE_KEYS = ("problem", "answer", "completions", "scores", "extracted", "lengths", "truncated", "entropy",
               "distinct_answers")
"""Keys of each entry of ``samples`` (one per problem; the lists have one value per sample)."""


# ----------------------------------------------------------------------------- pure aggregation


def canonical_answer(answer: str | None) -> str | None:
    """Vote key of an extracted answer: whitespace and surrounding ``$`` removed (``" 1 / 2 "`` == ``"1/2"``).

    Mathematically equal but differently written answers ("0.5", "\\frac12") still vote separately.
    """
    if answer is None:
        return None
    key = "".join(answer.split()).strip("$")
    return key or None


def distinct_answers(extracted: Sequence[str | None]) -> int:
    """How many different final answers a problem's samples gave (by ``canonical_answer``; none extracted: not one)."""
    return len({key for key in map(canonical_answer, extracted) if key is not None})


def token_nll(logprobs: Sequence[Sequence[float]]) -> tuple[float, int]:
    """``(-sum of the finite log-probs, their number)`` over a group of samples (see ``summarize``)."""
    finite = [lp for lps in logprobs for lp in lps if math.isfinite(lp)]
    return -sum(finite), len(finite)


def summarize(scores_per_problem: Sequence[Sequence[float | bool]],
              extracted_per_problem: Sequence[Sequence[str | None]],
              logprobs_per_problem: Sequence[Sequence[Sequence[float]]] | None,
              n: int,
              truncated_per_problem: Sequence[Sequence[bool]] | None = None,
              lengths_per_problem: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """Benchmark metrics from per-problem, per-sample results (pure; no model needed).

    scores_per_problem[i][j]:   correctness of sample j of problem i; a sample counts as correct when its score
                                is >= 1 (math_reward's correctness part; bools work)
    extracted_per_problem[i][j]: the answer extracted from it (None: none), for maj@k
    logprobs_per_problem[i][j]: log-probs of its sampled tokens under the sampling distribution (or None)
    truncated_per_problem:      whether it hit max_new_tokens (default: none did)
    lengths_per_problem:        its completion length in tokens (default: the number of log-probs)

    ``distinct_answers_mean`` is the mean over problems of ``distinct_answers``; ``coverage`` the share of problems
    with at least one correct sample (= pass@n). ``entropy_mean`` is the Monte Carlo estimate -mean(log p(token)) over all sampled tokens of all samples
    (token-weighted): the per-token NLL of the model's own samples, whose expectation is the entropy of the sampling
    distribution (logits / temperature, after top-p). It needs no extra forward pass. With temperature 0 it is
    only the NLL of the greedy tokens, not an entropy. None when no log-probs (or no tokens) are given.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    num = len(scores_per_problem)
    if num == 0:
        raise ValueError("no problems to summarize")
    if len(extracted_per_problem) != num:
        raise ValueError(f"{num} problems of scores but {len(extracted_per_problem)} of extracted answers")
    correct = []
    for i, (scores, extracted) in enumerate(zip(scores_per_problem, extracted_per_problem)):
        if len(scores) != n or len(extracted) != n:
            raise ValueError(f"problem {i}: expected n={n} scores and answers, got {len(scores)} and {len(extracted)}")
        correct.append([float(s) >= 1.0 for s in scores])
    counts = [sum(flags) for flags in correct]

    majority: dict[str, float] = {}
    for k in power_of_two_ks(n):
        votes = [maj_at_k([canonical_answer(a) for a in extracted], flags, k)
                 for extracted, flags in zip(extracted_per_problem, correct)]
        majority[str(k)] = sum(votes) / num

    nll, tokens = 0.0, 0
    for group in logprobs_per_problem or ():
        group_nll, group_tokens = token_nll(group)
        nll += group_nll
        tokens += group_tokens
    if lengths_per_problem is None:
        lengths_per_problem = ([[len(lps) for lps in group] for group in logprobs_per_problem]
                               if logprobs_per_problem is not None else None)
    lengths = [x for group in lengths_per_problem for x in group] if lengths_per_problem is not None else []
    truncated = [bool(t) for group in truncated_per_problem for t in group] if truncated_per_problem is not None else []

    return {
        "n": n,
        "num_problems": num,
        "avg@n": mean_at_n(counts, n),
        "pass@k": {str(k): sum(pass_at_k(n, c, k) for c in counts) / num for k in range(1, n + 1)},
        "maj@k": majority,
        "entropy_mean": nll / tokens if tokens else None,
        "distinct_answers_mean": sum(map(distinct_answers, extracted_per_problem)) / num,
        "coverage": sum(c > 0 for c in counts) / num,
        "response_length_mean": sum(lengths) / len(lengths) if lengths else None,
        "truncation_rate": sum(truncated) / len(truncated) if truncated else 0.0,
    }


def problem_seed(seed: int, benchmark: str, index: int) -> int:
    """Deterministic engine seed of problem ``index`` of ``benchmark`` (stable across runs and machines)."""
    return (seed * 1_000_003 + zlib.crc32(benchmark.encode()) + index) % (2**31 - 1)


# ----------------------------------------------------------------------------- the runner


def problem_record(row: dict, group: Sequence, rewards: Sequence) -> dict:
    """One entry of ``samples``: a problem, its n samples (``rl.rollout`` outputs) and their rewards."""
    extracted = [r.extracted for r in rewards]
    nll, tokens = token_nll([s.logprobs or [] for s in group])
    return {"problem": row["problem"], "answer": row["answer"], "completions": [s.text for s in group],
            "scores": [r.score for r in rewards], "extracted": extracted,
            "lengths": [len(s.completion_ids) for s in group], "truncated": [bool(s.truncated) for s in group],
            "entropy": nll / tokens if tokens else None, "distinct_answers": distinct_answers(extracted)}


def write_result(result: dict, out_dir: str | Path) -> Path:
    """Write one benchmark's result to ``out_dir/<benchmark_filename(name)>`` (atomically)."""
    path = result_path(out_dir, result["benchmark"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    tmp.replace(path)
    return path


def evaluate(model_dir: str, benchmarks: Sequence[str], cfg: EvalConfig, rollout_cfg=None, engine=None,
             data_cfg=None, out_dir: str | Path | None = None, point: str | None = None, *,
             model_name: str | None = None, trust_remote_code: bool = False, tokenizer=None,
             progress: bool = True) -> dict[str, dict]:
    """Sample ``cfg.n`` completions per problem of every benchmark and score them; ``{benchmark: result}``.

    model_dir:   a model directory (or hub id) for the tokenizer and, unless ``engine`` is given, the engine
    benchmarks:  benchmark names (see ``eksft.eval.benchmarks``); ``cfg.benchmarks`` is not read here
    rollout_cfg: an ``rl.rollout.RolloutConfig`` for the engine made here (default ``RolloutConfig()``: vLLM)
    engine:      an engine to use (e.g. the RL trainer's, serving the current weights); it is not shut down.
                 An engine created here serves all benchmarks and is shut down at the end.
    data_cfg:    the recipe's ``DataConfig`` (system prompt, instruction, chat-template variables) for prompts
    out_dir:     write ``<out_dir>/<benchmark_filename(benchmark)>`` per benchmark when given
    point:       label stored in the results (``"sft_start"``, ``"rl_step_50"``, ...)
    model_name:  what the results call the model (default: model_dir)

    All benchmarks are loaded before the engine starts, so a data error costs no engine start.
    """
    from rl.reward import math_reward
    from rl.rollout import SamplingConfig, prompt_token_ids

    benchmarks = list(benchmarks)
    check_distinct_result_files(benchmarks)
    problems = {name: load_benchmark(name, cfg.num_problems, data_cfg, cfg.revisions.get(name)) for name in benchmarks}
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    template_kwargs = data_cfg.chat_template_kwargs if data_cfg is not None else {}
    prompt_ids = {name: prompt_token_ids(tokenizer, [r["prompt"] for r in rows], template_kwargs)
                  for name, rows in problems.items()}
    sampling = SamplingConfig(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    # Problems per engine call: big enough to batch well, small enough for a live progress bar.
    chunk = max(1, 512 // cfg.n)

    own_engine = engine is None
    if own_engine:
        from rl.rollout import RolloutConfig, engine_from_config

        engine = engine_from_config(rollout_cfg or RolloutConfig(), model_dir, seed=cfg.seed,
                                    trust_remote_code=trust_remote_code)
    results: dict[str, dict] = {}
    try:
        from tqdm.auto import tqdm

        for b, name in enumerate(benchmarks):
            rows, ids = problems[name], prompt_ids[name]
            start = time.perf_counter()
            samples, rewards = [], []
            bar = tqdm(total=len(rows), desc=f"eval {name} [{b + 1}/{len(benchmarks)}]", unit="problem",
                       disable=not progress, leave=True)
            try:
                for lo in range(0, len(rows), chunk):
                    hi = min(lo + chunk, len(rows))
                    seeds = [problem_seed(cfg.seed, name, i) for i in range(lo, hi)]
                    outputs = engine.generate(ids[lo:hi], sampling, seeds)
                    texts = [s.text for group in outputs for s in group]
                    answers = [rows[i]["answer"] for i in range(lo, hi) for _ in range(cfg.n)]
                    res = math_reward(texts, answers, timeout_s=cfg.reward_timeout_s, fallback=cfg.answer_fallback)
                    for j, group in enumerate(outputs):
                        samples.append(group)
                        rewards.append(res[j * cfg.n:(j + 1) * cfg.n])
                    bar.update(hi - lo)
            finally:
                bar.close()
            wall = time.perf_counter() - start
            metrics = summarize(
                [[r.score for r in rs] for rs in rewards],
                [[r.extracted for r in rs] for rs in rewards],
                [[s.logprobs for s in group] for group in samples],
                cfg.n,
                truncated_per_problem=[[s.truncated for s in group] for group in samples],
                lengths_per_problem=[[len(s.completion_ids) for s in group] for group in samples],
            )
            result = {
                "benchmark": name,
                "model": model_name or str(model_dir),
                "point": point,
                **metrics,
                "wall_s": wall,
                "samples": [problem_record(row, group, rs) for row, group, rs in zip(rows, samples, rewards)],
            }
            result = {k: result[k] for k in RESULT_KEYS}
            results[name] = result
            if out_dir is not None:
                write_result(result, out_dir)
    finally:
        if own_engine:
            engine.shutdown()
    return results


# ----------------------------------------------------------------------------- per-problem values of a result


def problem_values(result: dict, metric: str) -> list[float] | None:
    """``[P]`` values of ``metric`` per problem, from a result's ``samples`` (what ``eksft.eval.stats`` resamples).

    metric: ``avg@n`` (share of correct samples), ``pass@K`` (unbiased, 1 <= K <= n), ``maj@K``, ``coverage``
    (solved at least once), ``distinct_answers`` or ``entropy`` (the problem's mean token entropy). Their means
    over problems are the result's ``avg@n``, ``pass@k[K]``, ``maj@k[K]``, ``coverage`` and
    ``distinct_answers_mean`` (``entropy_mean`` weights problems by their tokens instead). None when the result
    has no per-problem samples for it (results written before these fields existed).
    """
    samples = result.get("samples")
    n = result.get("n")
    if not samples or not isinstance(n, int) or len(samples) != result.get("num_problems"):
        return None
    if metric == "distinct_answers":  # older results have the extracted answers but not their count
        values = [s.get(metric, distinct_answers(s["extracted"]) if "extracted" in s else None) for s in samples]
        return None if any(v is None for v in values) else [float(v) for v in values]
    if metric == "entropy":
        values = [s.get(metric) for s in samples]
        return None if any(v is None for v in values) else [float(v) for v in values]
    if any(len(s.get("scores") or ()) != n for s in samples):
        return None
    correct = [[float(x) >= 1.0 for x in s["scores"]] for s in samples]
    if metric == "avg@n":
        return [sum(flags) / n for flags in correct]
    if metric == "coverage":
        return [float(any(flags)) for flags in correct]
    name, _, k_text = metric.partition("@")
    if name not in ("pass", "maj") or not k_text.isdigit() or not 1 <= int(k_text) <= n:
        raise ValueError(f"unknown metric {metric!r} (avg@n, pass@K, maj@K with 1 <= K <= n={n}, coverage, "
                         "distinct_answers, entropy)")
    k = int(k_text)
    if name == "pass":
        return [pass_at_k(n, sum(flags), k) for flags in correct]
    if any(len(s.get("extracted") or ()) != n for s in samples):
        return None
    return [maj_at_k([canonical_answer(a) for a in s["extracted"]], flags, k) for s, flags in zip(samples, correct)]
