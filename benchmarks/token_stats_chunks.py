"""The token statistics (`rl.common.token_stats`) on a CPU in cache-sized chunks or in large ones.

`token_statistics` works through the labelled positions ``chunk`` at a time; each chunk makes several passes over
its [chunk, V] float32 values (log-sum-exp, log p, p, the sums; backward: log p, p, the gradient). In one large
chunk every pass streams from memory; in chunks of ~4 MiB (`CPU_CHUNK_ELEMENTS`) they stay in the caches. The
results are the same whatever the chunk size. This measures, in one process and alternating:

1. forward + backward of `token_statistics` (label log-prob and entropy, as the GRPO loss uses them) on random
   float32 logits of ``--positions`` x the model's vocabulary, per chunk size;
2. the trainer worker's whole update (`TrainerWorker.update`: packed forwards, backwards, AdamW) with the CPU
   chunks and with the accelerator's (`DEFAULT_CHUNK_ELEMENTS`, which holds a whole micro-batch here).

    python benchmarks/token_stats_chunks.py
    python benchmarks/token_stats_chunks.py --model tiny:qwen2 --reps 1 --groups 2 --out /tmp/t.json

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
from _update_timing import (  # noqa: E402
    add_rollout_arguments, alternate, alternate_module_setting, synthetic_micro_batches, timed)


def statistics_alone(vocab: int, positions: int, chunks: list[int], reps: int) -> dict[str, Any]:
    import torch

    from rl.common.token_stats import token_statistics

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, positions, vocab, generator=g)
    labels = torch.randint(0, vocab, (1, positions), generator=g)
    mask = torch.ones(1, positions, dtype=torch.bool)

    def measure(chunk: str) -> dict[str, Any]:
        z = logits.detach().requires_grad_(True)

        def forward_backward() -> None:
            stats = token_statistics(z, mask, labels=labels, chunk_size=int(chunk))
            (stats.label_logprob.sum() + 0.01 * stats.entropy.sum()).backward()
        return {"seconds": timed(forward_backward, digits=4)[0]}

    measure(str(chunks[0]))  # warm-up
    out = alternate([str(c) for c in chunks], reps, measure)
    for c, v in out.items():
        v["chunk_mib"] = round(int(c) * vocab * 4 / 2**20, 2)
    return out


def run(args) -> dict[str, Any]:
    from transformers import AutoConfig

    import rl.common.token_stats as token_stats
    from eksft.models import resolve_model_dir
    from rl.common.precision import detect_hardware
    from rl.grpo.config import GRPOConfig
    from rl.workers import WorkerSettings, make_worker_group

    model_dir = resolve_model_dir(args.model)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    cpu_default = token_stats.default_chunk_size(vocab, "cpu")
    chunks = sorted({cpu_default, min(args.positions, token_stats.default_chunk_size(vocab, "cuda")), *args.chunks})
    alone = statistics_alone(vocab, args.positions, chunks, args.reps)
    for c, v in alone.items():
        print(f"[token_stats_chunks] statistics alone, chunk {c} positions ({v['chunk_mib']} MiB): "
              f"{v['median_s']:.3f}s", flush=True)

    batches, completion_tokens = synthetic_micro_batches(args, random.Random(args.seed), vocab)
    group = make_worker_group(WorkerSettings(model_dir=model_dir, learning_rate=1e-6, bf16=False,
                                             packing="shared_prompt"), 1)
    loss_settings = GRPOConfig().policy_loss_kwargs()
    settings = {"cpu": token_stats.CPU_CHUNK_ELEMENTS, "accelerator": token_stats.DEFAULT_CHUNK_ELEMENTS}

    try:
        group.update(batches, loss_settings)  # warm-up
        # CPU_CHUNK_ELEMENTS is read by every token_statistics call
        update = alternate_module_setting(token_stats, "CPU_CHUNK_ELEMENTS", settings,
                                          lambda: group.update(batches, loss_settings), args.reps,
                                          "token_stats_chunks update, chunks")
    finally:
        group.shutdown()
    for name, v in update.items():
        v["chunk_positions"] = settings[name] // vocab
    one_chunk = str(chunks[-1])
    return {"benchmark": "token_stats_chunks", "config": vars(args), "vocab": vocab, "cpu_default_chunk": cpu_default,
            "completion_tokens": completion_tokens, "hardware": detect_hardware("cpu").as_dict(),
            "machine": _results.cpu_machine(), "statistics_alone": alone, "update": update,
            "ratios": {"statistics_cpu_over_largest_chunk": alone[str(cpu_default)]["median_s"] / alone[one_chunk]["median_s"],
                       "update_cpu_over_accelerator_chunks": update["cpu"]["median_s"] / update["accelerator"]["median_s"]}}


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [f"### token_stats_chunks: {c['model']} (V = {result['vocab']}), float32, "
             f"{result['machine']['cpu_count']} cores", "",
             f"`token_statistics` alone, forward + backward on {c['positions']} positions:", "",
             "| chunk (positions) | float32 temporary MiB | s (median) | runs s |", "|---|---|---|---|"]
    for chunk, v in result["statistics_alone"].items():
        mark = " (CPU default)" if chunk == str(result["cpu_default_chunk"]) else ""
        lines.append(f"| {chunk}{mark} | {v['chunk_mib']} | {v['median_s']:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in v['seconds'])} |")
    lines += ["", f"The trainer worker's update (forwards, backwards, AdamW), {c['groups']} groups x {c['group']} "
                  f"completions of {c['min_tokens']}-{c['max_tokens']} tokens ({result['completion_tokens']} completion "
                  "tokens), packed:", "", "| chunks | positions per chunk | s (median) | runs s |", "|---|---|---|---|"]
    for name, v in result["update"].items():
        lines.append(f"| {name} | {v['chunk_positions']} | {v['median_s']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in v['seconds'])} |")
    r = result["ratios"]
    lines += ["", f"CPU chunks / largest: statistics {r['statistics_cpu_over_largest_chunk']:.3f}, "
                  f"update {r['update_cpu_over_accelerator_chunks']:.3f}.", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_rollout_arguments(p)
    p.set_defaults(min_tokens=3)
    p.add_argument("--positions", type=int, default=560,
                   help="labelled positions for the statistics alone (one packed group of grpo_step: ~560)")
    p.add_argument("--chunks", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64, 256],
                   help="chunk sizes in positions to time the statistics alone at (the defaults are added)")
    p.add_argument("--reps", type=int, default=3, help="runs per setting, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/token_stats_chunks_<capability tag>.json, "
                                 "and .md beside it)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    _results.write_and_print("token_stats_chunks", result, markdown(result), args.out)


if __name__ == "__main__":
    main()
