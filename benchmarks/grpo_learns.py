#!/usr/bin/env python
"""Does GRPO learn? pass@1 / pass@8 of the embedded model on held-out arithmetic, before and after N GRPO steps.

* Data: one-digit two-term arithmetic from the embedded generator (``generate("arithmetic", n, seed)``):
  training rows from ``--train-seed`` (1), held-out problems from ``--eval-seed`` (12345) with every
  problem that also occurs in the training rows removed (disjoint by problem text).
* Evaluation: ``--eval-samples`` (8) samples per held-out problem at temperature 1.0 with the vLLM
  engine (`rl.rollout.make_engine("vllm", ...)`), the same per-problem seeds before and after (paired
  comparison), rewarded by `rl.reward.math_reward` (the last ``\\boxed{}``, else with ``--answer-fallback
  last_number`` (default) the last number: the base model rarely boxes, so boxed-only scoring
  would measure formatting, not arithmetic); pass@1 and pass@8 by the unbiased estimator
  `rl.metrics.pass_at_k`, averaged over problems. Also reported: the share of completions with a
  boxed answer, mean completion length, truncation rate.
* Training: `rl.grpo.run_grpo` (vLLM rollouts, math reward, beta 0, no reference model) for ``--steps``
  steps of ``--prompts`` prompts x ``--group`` samples x ``--max-new-tokens`` tokens; its
  ``metrics.jsonl`` gives the per-step reward curve.

Each phase (evaluate base, train, evaluate final checkpoint) runs in its own subprocess of this
script (a fresh vLLM engine each; the final checkpoint is evaluated from disk, so the result does
not depend on the trainer's weight sync). Output: ``--out`` (JSON) and a Markdown table beside it.

Examples:
  python benchmarks/grpo_learns.py                       # defaults: 20 steps, 64 held-out problems
  python benchmarks/grpo_learns.py --steps 4 --eval-problems 16 --out /tmp/grpo_learns_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _child  # benchmarks/_child.py: run one phase in a fresh subprocess of this script
import _precision  # benchmarks/_precision.py: --bf16 / --rollout-dtype resolved as the trainers do
import _results  # benchmarks/_results.py: the JSON record and its markdown table


def rl_rows(rows: list[dict]) -> list[dict]:
    from eksft.data.formats import BOXED_ANSWER_INSTRUCTION, build_prompt

    return [{"prompt": build_prompt(r["problem"], instruction=BOXED_ANSWER_INSTRUCTION), "answer": r["answer"],
             "problem": r["problem"]} for r in rows]


def datasets(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows): held-out problems never occur in the training rows."""
    from eksft.data.generators import generate

    train = generate("arithmetic", args.train_rows, args.train_seed)
    seen = {r["problem"].strip() for r in train}
    pool = generate("arithmetic", 4 * args.eval_problems + 64, args.eval_seed)
    held, kept = [], set()
    for r in pool:
        key = r["problem"].strip()
        if key not in seen and key not in kept:
            held.append(r)
            kept.add(key)
        if len(held) == args.eval_problems:
            break
    if len(held) < args.eval_problems:
        raise RuntimeError(f"only {len(held)} held-out problems disjoint from the training rows")
    return rl_rows(train), rl_rows(held)


# --------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Sample ``eval_samples`` completions per held-out problem from ``args.eval_model`` and score them."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from rl.metrics import pass_at_k
    from rl.reward import find_last_boxed, math_reward
    from rl.rollout import SamplingConfig, make_engine, prompt_token_ids

    _, held = datasets(args)
    t0 = time.perf_counter()
    engine = make_engine("vllm", args.eval_model, dtype=args.rollout_dtype, max_model_len=args.max_model_len,
                         seed=args.seed)
    try:
        ids = prompt_token_ids(engine.tokenizer, [r["prompt"] for r in held])
        sampling = SamplingConfig(n=args.eval_samples, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
        seeds = [args.eval_sampling_seed * 1_000_003 + i for i in range(len(held))]  # same seeds before / after
        t = time.perf_counter()
        outputs = engine.generate(ids, sampling, seeds)
        gen_s = time.perf_counter() - t
    finally:
        engine.shutdown()
    n = args.eval_samples
    texts = [s.text for group in outputs for s in group]
    answers = [r["answer"] for r in held for _ in range(n)]
    results = math_reward(texts, answers, fallback=args.answer_fallback)
    correct = [sum(r.correct for r in results[i * n:(i + 1) * n]) for i in range(len(held))]
    samples = [s for group in outputs for s in group]
    boxes = [find_last_boxed(t).content for t in texts]
    ks = sorted({1, n} | {k for k in (2, 4) if k < n})
    out = {
        "model": args.eval_model,
        "problems": len(held),
        "samples_per_problem": n,
        **{f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in ks},
        "correct_per_problem": correct,
        # from the text, not from r.extracted (which holds the fallback number when there is no box)
        "boxed_share": sum(b is not None for b in boxes) / len(boxes),
        "empty_box_share": sum(b is not None and not b.strip() for b in boxes) / len(boxes),
        "completion_length_mean": sum(len(s.completion_ids) for s in samples) / len(samples),
        "truncation_rate": sum(s.truncated for s in samples) / len(samples),
        "generate_s": gen_s,
        "tokens_per_s": sum(len(s.completion_ids) for s in samples) / gen_s,
        "wall_s": time.perf_counter() - t0,
        "example": {"problem": held[0]["problem"], "answer": held[0]["answer"], "completion": samples[0].text[:400]},
    }
    print(f"[eval] {args.eval_model}: pass@1 {out['pass@1']:.3f} pass@{n} {out[f'pass@{n}']:.3f} "
          f"boxed {out['boxed_share']:.2f} len {out['completion_length_mean']:.1f} ({gen_s:.0f}s)", flush=True)
    return out


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from eksft.layout import RLStageDir
    from eksft.models import resolve_model_dir
    from rl.grpo import GRPOConfig, run_grpo
    from rl.rollout import RolloutConfig

    train, _ = datasets(args)
    cfg = GRPOConfig(bf16=args.bf16, steps=args.steps, prompts_per_step=args.prompts, group_size=args.group,
                     max_new_tokens=args.max_new_tokens, temperature=1.0, learning_rate=args.lr,
                     micro_batch_size=args.micro_batch, beta_kl=0.0, format_weight=args.format_weight,
                     answer_fallback=args.answer_fallback, save_every=10**6, seed=args.seed)
    rollout = RolloutConfig(engine="vllm", dtype=args.rollout_dtype, max_model_len=args.max_model_len)
    t0 = time.perf_counter()
    stage = RLStageDir(Path(args.run_dir))
    final = run_grpo(resolve_model_dir(args.model), train, cfg, stage.trainer_outputs(), rollout=rollout, kl_metric=False)
    wall = time.perf_counter() - t0
    metrics = [json.loads(line) for line in stage.metrics.read_text().splitlines() if line]
    return {"final_checkpoint": str(final), "wall_s": wall, "config": cfg.model_dump(), "metrics": metrics}


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace, task: str, extra: list[str]) -> dict[str, Any]:
    child = _child.run_child(__file__, task, [*sys.argv[1:], *extra, *_precision.pinned_argv(args)],
                             timeout_s=args.child_timeout,
                             echo=lambda line: line.startswith(("[eval]", "[rl]")))
    if not child.ok:
        why = f"timed out after {args.child_timeout} s" if child.timed_out else f"exit {child.returncode}"
        raise RuntimeError(f"child {task} failed ({why}):\n{child.log[-4000:]}")
    return child.result


def curve(metrics: list[dict]) -> list[dict]:
    keys = ("step", "reward_mean", "pass@1", "pass@8", "zero_variance_share", "response_length_mean",
            "truncation_rate", "entropy", "grad_norm", "clip_fraction", "logprob_gap_engine_trainer",
            "time/generate", "time/reward", "time/train", "time/sync")
    return [{k: m[k] for k in keys if k in m} for m in metrics]


def markdown(result: dict[str, Any]) -> str:
    s, b, a = result["settings"], result["before"], result["after"]
    n = s["eval_samples"]

    def f(x, d=3):
        return "-" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))

    lines = [
        f"### grpo_learns: {s['model']}, one-digit arithmetic, {s['steps']} GRPO steps of {s['prompts']} prompts x "
        f"{s['group']} samples x <= {s['max_new_tokens']} tokens, lr {s['lr']}, format weight {s['format_weight']}"
        + f", answer fallback {s['answer_fallback']}",
        "",
        _precision.header(result["precision"]),
        "",
        f"Held-out: {b['problems']} problems (seed {s['eval_seed']}, disjoint from the {s['train_rows']} training rows of "
        f"seed {s['train_seed']}), {n} samples each at temperature 1.0, same seeds before and after.",
        "",
        f"| model | pass@1 | pass@{n} | boxed share | empty-box share | completion length | truncation rate |",
        "|---|---|---|---|---|---|---|",
        f"| before (base) | {f(b['pass@1'])} | {f(b[f'pass@{n}'])} | {f(b['boxed_share'], 2)} | "
        f"{f(b['empty_box_share'], 2)} | {f(b['completion_length_mean'], 1)} | {f(b['truncation_rate'], 2)} |",
        f"| after {s['steps']} steps | {f(a['pass@1'])} | {f(a[f'pass@{n}'])} | {f(a['boxed_share'], 2)} | "
        f"{f(a['empty_box_share'], 2)} | {f(a['completion_length_mean'], 1)} | {f(a['truncation_rate'], 2)} |",
        "",
        "Training reward (mean over each step's rollouts): "
        + ", ".join(f(m.get("reward_mean"), 2) for m in result["reward_curve"]),
        "",
        f"Wall time: {f(result['total_wall_s'], 0)} s (training {f(result['train_wall_s'], 0)} s).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--format-weight", type=float, default=0.0,
                   help="weight of the format term (exactly one closed \\boxed{}) added to the 0/1 correctness reward")
    p.add_argument("--answer-fallback", default="last_number", choices=["none", "last_number"],
                   help="answer of a completion without a closed \\boxed{} (training reward and evaluation)")
    _precision.add_precision_args(p)  # --bf16 / --no-bf16, --rollout-dtype; default auto
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--train-rows", type=int, default=256)
    p.add_argument("--train-seed", type=int, default=1)
    p.add_argument("--eval-problems", type=int, default=64)
    p.add_argument("--eval-seed", type=int, default=12345)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--eval-sampling-seed", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default=None, help="GRPO run directory (default: a temporary one)")
    p.add_argument("--child-timeout", type=float, default=3600)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/grpo_learns_<capability tag>.json)")
    p.add_argument("--child", choices=["eval", "train"], help=argparse.SUPPRESS)
    p.add_argument("--eval-model", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    _precision.resolve(args)  # the parent's values reach the children through pinned_argv
    if args.out is None:
        args.out = _results.default_path("grpo_learns", _precision.record(args)["hardware"]["tag"])
    if args.child:
        _results.write_json(args.json_out, {"eval": run_eval, "train": run_train}[args.child](args))
        return 0

    _child.stop_children_on_signal()
    from eksft.models import resolve_model_dir

    base = resolve_model_dir(args.model)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="grpo_learns_run_") as tmp:
        run_dir = args.run_dir or tmp
        print(f"== evaluate base model ({args.eval_problems} problems x {args.eval_samples})", flush=True)
        before = run_child(args, "eval", ["--eval-model", base])
        print(f"== GRPO: {args.steps} steps of {args.prompts} x {args.group} x {args.max_new_tokens} tokens", flush=True)
        train = run_child(args, "train", [] if args.run_dir else ["--run-dir", run_dir])
        print("== evaluate final checkpoint", flush=True)
        after = run_child(args, "eval", ["--eval-model", train["final_checkpoint"]])
    n = args.eval_samples
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "eval_model", "json_out")}
    result = {
        "benchmark": "grpo_learns",
        "settings": settings,
        "precision": _precision.record(args),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "before": before,
        "after": after,
        "delta": {"pass@1": after["pass@1"] - before["pass@1"], f"pass@{n}": after[f"pass@{n}"] - before[f"pass@{n}"]},
        "went_up": after["pass@1"] > before["pass@1"],
        "reward_curve": curve(train["metrics"]),
        "grpo_config": train["config"],
        "train_wall_s": train["wall_s"],
        "total_wall_s": time.perf_counter() - t0,
    }
    table = markdown(result)
    _results.write_results(args.out, result, table)
    print(table)
    return 0 if result["went_up"] else 1


if __name__ == "__main__":
    sys.exit(main())
