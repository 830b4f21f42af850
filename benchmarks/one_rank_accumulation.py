"""One bf16 rank accumulating its micro-batches unsharded, or resharding and reducing after each one.

With one trainer rank and bf16 compute the model is FSDP2 over that one rank (its mixed-precision policy casts the
float32 weights to bf16 for the forwards). `rl.workers.trainer_worker.ONE_RANK_UNSHARDED_ACCUMULATION` keeps the
bf16 parameters gathered and the float32 gradients unsharded across an optimizer step's micro-batches, reducing
and resharding once, in the last backward; without it FSDP2 casts every layer's weights again for every
micro-batch's forward and backward and copies its gradients through a one-rank reduce-scatter after each backward.
The arithmetic is the same (`tests/test_workers.py`: bitwise). This measures, in one process and alternating, the
setting on and off for:

1. the GRPO update (`TrainerWorker.update`): ``--groups`` packed groups, one micro-batch each, as in
   `benchmarks/grpo_step.py`;
2. the cold start's step (`TrainerWorker.train_step` with the EKSFT objective and its frozen reference, packed
   rows as ``sft.packing: auto`` runs them on a CPU): ``--sft-micro-batches`` micro-batches of the recipe's
   ``sft.batch_size`` examples of its generated data (``sft.grad_accum`` of them per step).

bf16 only: a float32 rank runs without FSDP, where the setting does nothing. On a CPU without native bf16 the
bf16 compute is emulated (tens of times slower): run it where `detect_hardware` reports native bf16, or on a GPU.

    python benchmarks/one_rank_accumulation.py
    python benchmarks/one_rank_accumulation.py --model tiny:qwen2 --reps 1 --groups 2 --sft-micro-batches 2 \\
        --out /tmp/a.json

No timing is asserted anywhere; the ratios are from one run, alternating.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
try:  # run from a plain checkout
    import rl  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402
from _update_timing import add_rollout_arguments, alternate_module_setting, synthetic_micro_batches  # noqa: E402

SETTINGS = {"unsharded": True, "per_micro_batch": False}


def alternate_setting(step, reps: int, tag: str) -> dict[str, Any]:
    """``step()`` once to warm up, then ``reps`` times per setting of `ONE_RANK_UNSHARDED_ACCUMULATION` (read by
    every step), alternating; the setting is restored after."""
    import rl.workers.trainer_worker as trainer_worker

    step()
    return alternate_module_setting(trainer_worker, "ONE_RANK_UNSHARDED_ACCUMULATION", SETTINGS, step, reps, tag)


def run(args) -> dict[str, Any]:
    from transformers import AutoConfig

    from eksft.config import load_recipe
    from eksft.data import build_sft_dataset
    from eksft.models import load_tokenizer, resolve_model_dir
    from eksft.sft.run import worker_settings
    from eksft.sft.step import ObjectiveStepLoss, SFTMicroBatch
    from rl.common.precision import detect_hardware
    from rl.grpo.config import GRPOConfig
    from rl.workers import WorkerSettings, make_worker_group

    model_dir = resolve_model_dir(args.model)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    out: dict[str, Any] = {"benchmark": "one_rank_accumulation", "config": vars(args),
                           "hardware": detect_hardware("cpu").as_dict(), "machine": _results.cpu_machine()}

    batches, completion_tokens = synthetic_micro_batches(args, random.Random(args.seed), vocab)
    group = make_worker_group(WorkerSettings(model_dir=model_dir, learning_rate=1e-6, bf16=True,
                                             packing="shared_prompt"), 1)
    loss_settings = GRPOConfig().policy_loss_kwargs()
    try:
        out["grpo_update"] = alternate_setting(lambda: group.update(batches, loss_settings), args.reps,
                                               "one_rank_accumulation grpo update")
    finally:
        group.shutdown()
    out["completion_tokens"] = completion_tokens

    recipe = load_recipe(args.recipe, [f"model.name={args.model}", "sft.bf16=true", "sft.workers=1"])
    tokenizer = load_tokenizer(model_dir)
    examples, _ = build_sft_dataset(recipe, tokenizer)
    size = recipe.sft.batch_size
    if len(examples) < size * args.sft_micro_batches:
        raise SystemExit(f"{args.recipe}: {len(examples)} examples, fewer than {args.sft_micro_batches} micro-batches "
                         f"of sft.batch_size {size}")
    sft_batches = [SFTMicroBatch.of(examples[i * size:(i + 1) * size]) for i in range(args.sft_micro_batches)]
    loss = ObjectiveStepLoss(recipe.arm("eksft").objective, tokenizer.pad_token_id, with_reference=True, packed=True)
    group = make_worker_group(worker_settings(recipe, model_dir, with_reference=True), 1)
    try:
        out["sft_step"] = alternate_setting(lambda: group.train_step(sft_batches, loss, learning_rate=1e-6),
                                            args.reps, "one_rank_accumulation cold-start step")
    finally:
        group.shutdown()
    out["sft_tokens"] = sum(len(ids) for mb in sft_batches for ids in mb.input_ids)
    out["sft_batch_size"] = size
    parts = ("grpo_update", "sft_step")
    out["ratios"] = {f"{part}_unsharded_over_per_micro_batch":
                     out[part]["unsharded"]["median_s"] / out[part]["per_micro_batch"]["median_s"] for part in parts}
    # repetition r of both settings ran back to back: the pairs where unsharded was the faster
    out["unsharded_faster_pairs"] = {part: sum(a < b for a, b in zip(out[part]["unsharded"]["seconds"],
                                                                    out[part]["per_micro_batch"]["seconds"]))
                                     for part in parts}
    return out


def markdown(result: dict[str, Any]) -> str:
    c, r = result["config"], result["ratios"]
    lines = [f"### one_rank_accumulation: {c['model']}, one bf16 rank (FSDP2), {result['machine']['cpu_count']} cores",
             "", "| step | accumulation | s (median) | runs s |", "|---|---|---|---|"]
    what = {"grpo_update": f"GRPO update, {c['groups']} packed groups of {c['group']} ({result['completion_tokens']} "
                           "completion tokens)",
            "sft_step": f"cold-start step (eksft + reference), {c['sft_micro_batches']} packed micro-batches of "
                        f"{result['sft_batch_size']} ({result['sft_tokens']} tokens)"}
    for part, label in what.items():
        for name, v in result[part].items():
            lines.append(f"| {label} | {name} | {v['median_s']:.2f} | {', '.join(f'{x:.2f}' for x in v['seconds'])} |")
    pairs = result["unsharded_faster_pairs"]
    lines += ["", f"unsharded / per micro-batch: GRPO update {r['grpo_update_unsharded_over_per_micro_batch']:.3f} "
                  f"(unsharded the faster in {pairs['grpo_update']} of {c['reps']} back-to-back pairs), cold-start "
                  f"step {r['sft_step_unsharded_over_per_micro_batch']:.3f} ({pairs['sft_step']} of {c['reps']}).", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_rollout_arguments(p)
    p.set_defaults(min_tokens=3)
    p.add_argument("--recipe", default=str(REPO_ROOT / "recipes" / "quickstart.yaml"),
                   help="the cold start's data and sft.batch_size")
    p.add_argument("--sft-micro-batches", type=int, default=4, help="micro-batches per cold-start step")
    p.add_argument("--reps", type=int, default=5,
                   help="runs per setting, alternating (at 3 the effect was within this machine's noise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/one_rank_accumulation_<capability tag>.json, "
                                 "and .md beside it)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    _results.write_and_print("one_rank_accumulation", result, markdown(result), args.out)


if __name__ == "__main__":
    main()
