"""The GRPO update with and without skipping the backward of micro-batches whose loss has no gradient.

What it measures: the trainer worker's update (`TrainerWorker.update`: packed forwards, backwards, AdamW) on
synthetic rollouts of `benchmarks/grpo_step.py`'s shape (8 groups x 8 completions, 48-token prompts, 30-128 token
completions, one group per micro-batch), where a chosen share of the groups has advantage 0 on every completion
(a zero-variance group: every reward equal, as when all 8 answers are wrong or all right). With
``skip_zero_gradient`` on (the default) such a micro-batch runs its forward without autograd, for the metrics, and
no backward; off, it runs the backward like every other (as verl and TRL do). The parameters after the update are
the same either way (`tests/test_workers.py` checks them bitwise); this records the time.

For each share of zero-variance groups it alternates the two settings in one process, from the same rollouts.

    python benchmarks/zero_gradient.py                      # the embedded model, shares 0, 0.5 and 1
    python benchmarks/zero_gradient.py --model tiny:qwen2 --reps 1 --out /tmp/z.json

No timing is asserted anywhere; the ratios are from one run, alternating.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from _update_timing import add_rollout_arguments, alternate, synthetic_micro_batches, timed  # noqa: E402

SETTINGS = {"backward_always": False, "skip_zero_gradient": True}


def with_zero_groups(batches, share: float):
    """The first ``round(share * groups)`` micro-batches (one group each) with every advantage 0."""
    zero = round(share * len(batches))
    return [dataclasses.replace(mb, advantages=[0.0] * len(mb)) if i < zero else mb for i, mb in enumerate(batches)]


def run(args) -> dict[str, Any]:
    from eksft.models import resolve_model_dir
    from rl.common.precision import detect_hardware
    from rl.grpo.config import GRPOConfig
    from rl.workers import WorkerSettings, make_worker_group

    from transformers import AutoConfig

    model_dir = resolve_model_dir(args.model)
    group = make_worker_group(WorkerSettings(model_dir=model_dir, learning_rate=1e-6, bf16=False,
                                             packing="shared_prompt"), 1)
    worker = group.worker  # one rank in this process: its setting is switched between updates

    def use(name: str) -> None:
        worker.settings = dataclasses.replace(worker.settings, skip_zero_gradient=SETTINGS[name])

    loss_settings = GRPOConfig().policy_loss_kwargs()
    batches, completion_tokens = synthetic_micro_batches(args, random.Random(args.seed),
                                                         AutoConfig.from_pretrained(model_dir).vocab_size)
    out: dict[str, Any] = {}

    def measure(name: str, rollouts) -> dict[str, Any]:
        use(name)
        seconds, metrics = timed(lambda: group.update(rollouts, loss_settings))
        return {"seconds": seconds, "skipped_backward": metrics["skipped_backward"]}

    try:
        group.update(batches, loss_settings)  # warm-up
        for share in args.shares:
            rollouts = with_zero_groups(batches, share)
            row = out[str(share)] = alternate(SETTINGS, args.reps, lambda name: measure(name, rollouts),
                                              tag=f"zero_gradient share {share}")
            row["skip_over_always"] = row["skip_zero_gradient"]["median_s"] / row["backward_always"]["median_s"]
    finally:
        group.shutdown()
    return {"benchmark": "zero_gradient", "config": vars(args), "completion_tokens": completion_tokens,
            "hardware": detect_hardware("cpu").as_dict(), "machine": _results.cpu_machine(),
            "by_zero_variance_share": out}


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [f"### zero_gradient: the GRPO update of {c['model']}, {c['groups']} groups x {c['group']} completions "
             f"({result['completion_tokens']} completion tokens), float32, packed (shared_prompt), "
             f"{result['machine']['cpu_count']} cores", "",
             "| zero-variance groups | backward always: s (median) | skip_zero_gradient: s (median) | ratio | "
             "backwards skipped |", "|---|---|---|---|---|"]
    for share, row in result["by_zero_variance_share"].items():
        always, skip = row["backward_always"], row["skip_zero_gradient"]
        lines.append(f"| {float(share):.0%} | {always['median_s']:.2f} ({', '.join(f'{x:.2f}' for x in always['seconds'])}) | "
                     f"{skip['median_s']:.2f} ({', '.join(f'{x:.2f}' for x in skip['seconds'])}) | "
                     f"{row['skip_over_always']:.3f} | {skip['skipped_backward'][0]:.0%} |")
    return "\n".join(lines + [""])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rollout_arguments(p)
    p.add_argument("--shares", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.5, 1.0],
                   help="shares of zero-variance groups, comma-separated")
    p.add_argument("--reps", type=int, default=2, help="updates per setting and share, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/zero_gradient_<capability tag>.json, "
                                 "and .md beside it)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    _results.write_and_print("zero_gradient", result, markdown(result), args.out)


if __name__ == "__main__":
    main()
