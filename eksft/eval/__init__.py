"""Evaluation: n samples per problem on math benchmarks, scored by math-verify, with exploration metrics.

    from eksft.eval import EvalConfig, evaluate, load_benchmark, BENCHMARKS
    results = evaluate(model_dir, ["math500", "embedded:arithmetic"], EvalConfig(n=16), out_dir="runs/x/eval/sft_end")

Metrics per benchmark: avg@n, pass@k for every k in 1..n, maj@k (k = 1, 2, 4, ..., n), mean token entropy of the
policy on its own samples, distinct answers per problem, coverage, response length, truncation rate, wall time; one
JSON file per benchmark.
Per problem, the result keeps what statistics need (``runner.problem_values``); ``eksft.eval.stats`` turns those
into bootstrap intervals and paired differences (the report's numbers).
Command line: ``eksft eval --model M --benchmarks math500,gsm8k --n 16``.
"""

from eksft.eval.benchmarks import BENCHMARKS, BenchmarkSpec, load_benchmark
from eksft.eval.config import EvalConfig
from eksft.eval.runner import RESULT_KEYS, evaluate, summarize, write_result

__all__ = ["BENCHMARKS", "BenchmarkSpec", "EvalConfig", "RESULT_KEYS", "evaluate", "load_benchmark", "summarize",
           "write_result"]
