"""``eksft eval``: evaluate a model on math benchmarks from the command line.

Wired into ``eksft.cli.build_parser`` with::

    from eksft.eval.cli import add_eval_parser
    add_eval_parser(sub)          # sub = parser.add_subparsers(...)

``add_eval_parser`` sets ``func=cmd_eval`` on the new sub-parser, so ``eksft.cli.main`` dispatches it like the others.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from eksft.data.formats import BOXED_ANSWER_INSTRUCTION
from eksft.layout import CHECKPOINT_DIR, CHECKPOINTS_DIR, RL_STEP_PREFIX

DESCRIPTION = (
    "Sample N completions per problem from a model (vLLM by default, or transformers with --engine hf), score the "
    "last \\boxed{} answer of each with math-verify, and report per benchmark: avg@n (mean accuracy), pass@k for "
    "every k in 1..n (unbiased estimator), maj@k (majority vote of the extracted answers; k = 1, 2, 4, ..., n), the "
    "policy's mean token entropy on its own samples (-mean log-prob of the sampled tokens), distinct final answers "
    "per problem, coverage (share of problems solved at least once), response length and truncation rate; the table "
    "gives avg@n's 95% bootstrap interval over the problems. Writes one JSON file per benchmark (metrics and every sample) to --out, named after the benchmark "
    "(gsm8k.json, embedded_arithmetic.json; a local file after its stem: ../data/gsm8k_test.jsonl -> gsm8k_test.json, "
    "and two files with one stem are refused), and prints a table. "
    "Benchmarks: math500, aime24, aime25, amc23, gsm8k, minerva, olympiadbench (HF hub or its cache), "
    "embedded:arithmetic|multistep|gsm|mix (generated offline with a held-out seed, 64 problems by default), or a "
    "local .jsonl/.json/.parquet file with problem|question and answer|final_answer fields. Prompts use the "
    f"recipe's system prompt and instruction (default: '{BOXED_ANSWER_INSTRUCTION}') and its chat-template "
    "variables (data.chat_template_kwargs)."
)

EPILOG = ("Examples:\n"
          "  eksft eval --model embedded:smollm2-135m-instruct --benchmarks embedded:arithmetic --n 8 --engine hf\n"
          "  eksft eval --model runs/quickstart/eksft/sft/checkpoint --benchmarks math500,gsm8k --n 16 --num-problems 100\n"
          "  eksft eval --model Qwen/Qwen2.5-Math-1.5B --benchmarks aime24 --n 1 --temperature 0   # greedy\n"
          "Recipes are YAML files validated against eksft.config.Recipe; override any key with --set a.b=value.")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to ``subparsers`` (from ``ArgumentParser.add_subparsers``); returns it."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on math benchmarks (avg@n, pass@k, maj@k, entropy) and write JSON results",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", "-m", help="model name (embedded:..., tiny:..., hub id) or checkpoint directory "
                                         "(default: the recipe's model.name)")
    p.add_argument("--benchmarks", "-b", type=_csv, metavar="A,B,...",
                   help="comma-separated benchmark names (default: embedded:arithmetic, or the recipe's eval.benchmarks)")
    p.add_argument("--n", type=int, help="samples per problem (default 8); pass@k is reported for every k <= n")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 1.0; 0 with --n 1 is greedy)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (default 1.0)")
    p.add_argument("--max-tokens", type=int, help="max new tokens per completion (default 512)")
    p.add_argument("--num-problems", type=int, help="first N problems of each benchmark (embedded: how many to make)")
    p.add_argument("--seed", type=int, help="sampling seed (default 0)")
    p.add_argument("--answer-fallback", choices=["none", "last_number"],
                   help="answer of a completion without a closed \\boxed{}: none (incorrect, default) or its last number")
    p.add_argument("--engine", choices=["vllm", "hf"], help="rollout engine (default: the recipe's rollout.engine, vllm)")
    p.add_argument("--out", "-o", help="directory of the result files (default: <output_dir>/eval/<model basename>)")
    p.add_argument("--point", help="label stored in the results, e.g. sft_end (default: none)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--recipe", "-r", help="YAML recipe for the prompt (data.instruction, data.system_prompt, "
                                          "data.chat_template_kwargs), rollout "
                                          "settings (rollout.*) and model (default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set rollout.max_model_len=4096 (repeatable)")
    p.set_defaults(func=cmd_eval)
    return p


def model_basename(name: str) -> str:
    """Directory name for a model's results: ``embedded_smollm2-135m-instruct``, ``Qwen2.5-Math-1.5B``,
    ``sft-checkpoint`` (checkpoint directories keep their parent's name)."""
    path = Path(name.rstrip("/"))
    if ":" in name and not path.exists():
        base = name
    elif path.name in (CHECKPOINT_DIR, CHECKPOINTS_DIR) or path.name.startswith(f"{RL_STEP_PREFIX}-"):
        base = f"{path.parent.name}-{path.name}"
    else:
        base = path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "model"


def eval_config_from_args(args: argparse.Namespace, base=None):
    """``EvalConfig``: ``base`` (e.g. a recipe's eval section; default the defaults) with the flags given applied."""
    from eksft.eval.config import EvalConfig

    values = (base or EvalConfig()).model_dump()
    flags = {"benchmarks": args.benchmarks, "n": args.n, "temperature": args.temperature, "top_p": args.top_p,
             "max_new_tokens": args.max_tokens, "num_problems": args.num_problems, "seed": args.seed,
             "answer_fallback": args.answer_fallback}
    values.update({k: v for k, v in flags.items() if v is not None})
    return EvalConfig.model_validate(values)


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _interval(result: dict) -> str:
    """The 95% bootstrap interval of avg@n over the problems, "-" without per-problem samples."""
    from eksft.eval.runner import problem_values
    from eksft.eval.stats import bootstrap_ci

    values = problem_values(result, "avg@n")
    if values is None or len(values) < 2:
        return "-"
    _, low, high = bootstrap_ci(values)
    return f"[{low:.3f}, {high:.3f}]"


def print_table(results: dict[str, dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("benchmark", "problems", "n", "avg@n", "95% CI", "pass@1", "pass@n", "maj@n", "coverage", "answers",
                "entropy", "length", "trunc", "time"):
        table.add_column(col, justify="left" if col == "benchmark" else "right", no_wrap=True)
    for name, r in results.items():
        n = str(r["n"])
        table.add_row(name, str(r["num_problems"]), n, _fmt(r["avg@n"]), _interval(r), _fmt(r["pass@k"]["1"]),
                      _fmt(r["pass@k"][n]), _fmt(r["maj@k"][n]), _fmt(r["coverage"]), _fmt(r["distinct_answers_mean"], 2),
                      _fmt(r["entropy_mean"]), _fmt(r["response_length_mean"], 1), _fmt(r["truncation_rate"], 2),
                      f"{r['wall_s']:.1f}s")
    console = Console(highlight=False)
    if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
        console = Console(highlight=False, width=200)
    console.print(table)


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``eksft eval``: load the recipe (for prompts/rollout), evaluate, print the table, write the JSON files."""
    import sys

    from pydantic import ValidationError

    from eksft.config import format_validation_error, load_recipe
    from eksft.eval.config import EvalConfig
    from eksft.stages import eval_stage

    recipe = load_recipe(args.recipe, args.overrides)
    base = getattr(recipe, "eval", None)
    try:
        cfg = eval_config_from_args(args, base if isinstance(base, EvalConfig) else None)
    except ValidationError as e:
        print(f"eval settings error:\n{format_validation_error(e, EvalConfig, 'eval')}", file=sys.stderr)
        return 2
    model = args.model or recipe.model.name
    rollout = recipe.rollout.model_copy(update={"engine": args.engine}) if args.engine else recipe.rollout
    out = Path(args.out) if args.out else Path(recipe.output_dir) / "eval" / model_basename(model)
    recipe = recipe.model_copy(update={"eval": cfg, "rollout": rollout})
    results = eval_stage(recipe, model, out, args.point, progress=not args.quiet)
    print_table(results, f"{model}: n={cfg.n}, temperature={cfg.temperature}, max_new_tokens={cfg.max_new_tokens}")
    print(f"[eval] results: {out}/")
    return 0
