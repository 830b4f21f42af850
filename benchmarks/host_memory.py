"""The GRPO update with glibc's malloc defaults vs `rl.common.host_memory.reusing_freed_memory`, in one process.

What it measures: the trainer worker's update (`TrainerWorker.update`: packed forwards, backwards, AdamW) on
synthetic rollouts of `benchmarks/grpo_step.py`'s shape (8 groups x 8 completions, 48-token prompts, 30-128 token
completions, one group per micro-batch), alternating between two settings of this process's malloc:

* ``glibc_default``: the mmap threshold at 32 MiB and the trim threshold at 64 MiB, where glibc's dynamic defaults
  settle once a process has freed a few large blocks: larger allocations are fresh mmaps, page-faulted in on first
  write and unmapped on free;
* ``heap_reuse``: what a CPU trainer worker's compute calls set (`reusing_freed_memory`): allocations below 1 GiB
  come from the heap and freed memory stays there for the next one.

Per update it records the wall time and the minor page faults (pages the kernel zero-filled for this process).
The worker returns freed memory (``malloc_trim``) after each update in both settings, as in the product.

    python benchmarks/host_memory.py                      # the embedded model, 2 updates per setting
    python benchmarks/host_memory.py --model tiny:qwen2 --reps 1 --out /tmp/h.json

No timing is asserted anywhere; the ratio is from one run, alternating.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
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

from rl.common import host_memory  # noqa: E402

SETTINGS = {"glibc_default": host_memory.GLIBC_SETTLED_THRESHOLDS, "heap_reuse": host_memory.HEAP_THRESHOLDS}


def set_malloc(name: str) -> None:
    """What the worker's compute calls set within (`reusing_freed_memory` reads the module attribute)."""
    host_memory.HEAP_THRESHOLDS = SETTINGS[name]
    if not host_memory.set_thresholds(*SETTINGS[name]):
        raise SystemExit(f"glibc refused the malloc setting {name}")


def run(args) -> dict[str, Any]:
    from eksft.models import resolve_model_dir
    from rl.grpo.config import GRPOConfig
    from rl.workers import WorkerSettings, make_worker_group

    if not sys.platform.startswith("linux"):
        raise SystemExit("glibc's malloc settings: Linux only")
    from transformers import AutoConfig

    rng = random.Random(args.seed)
    model_dir = resolve_model_dir(args.model)
    group = make_worker_group(WorkerSettings(model_dir=model_dir, learning_rate=1e-6, bf16=False, packing="shared_prompt"), 1)
    loss_settings = GRPOConfig().policy_loss_kwargs()
    batches, completion_tokens = synthetic_micro_batches(args, rng, AutoConfig.from_pretrained(model_dir).vocab_size)

    def measure(name: str) -> dict[str, Any]:
        set_malloc(name)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds, _ = timed(lambda: group.update(batches, loss_settings))
        return {"seconds": seconds, "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}

    try:
        set_malloc("heap_reuse")
        group.update(batches, loss_settings)  # warm-up
        out = alternate(SETTINGS, args.reps, measure, tag="host_memory")
    finally:
        host_memory.HEAP_THRESHOLDS = SETTINGS["heap_reuse"]  # for whatever runs next in this process
        group.shutdown()
    for v in out.values():
        v["median_page_faults"] = statistics.median(v["page_faults"])
    from rl.common.precision import detect_hardware

    return {"benchmark": "host_memory", "config": vars(args), "completion_tokens": completion_tokens,
            "hardware": detect_hardware("cpu").as_dict(), "machine": _results.cpu_machine(),
            "settings": {k: {"mmap_threshold": m, "trim_threshold": t} for k, (m, t) in SETTINGS.items()},
            "updates": out,
            "ratios": {"heap_reuse_over_default_time": out["heap_reuse"]["median_s"] / out["glibc_default"]["median_s"],
                       "heap_reuse_over_default_page_faults":
                           out["heap_reuse"]["median_page_faults"] / max(out["glibc_default"]["median_page_faults"], 1)}}


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [f"### host_memory: the GRPO update of {c['model']}, {c['groups']} groups x {c['group']} completions "
             f"({result['completion_tokens']} completion tokens), float32, packed (shared_prompt), "
             f"{result['machine']['cpu_count']} cores", "",
             "| malloc setting | mmap / trim threshold | update s (median) | runs s | page faults per update |",
             "|---|---|---|---|---|"]
    for name, v in result["updates"].items():
        s = result["settings"][name]
        lines.append(f"| {name} | {s['mmap_threshold'] >> 20} / {s['trim_threshold'] >> 20} MiB | {v['median_s']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in v['seconds'])} | {', '.join(str(x) for x in v['page_faults'])} |")
    r = result["ratios"]
    lines += ["", f"heap_reuse / glibc_default: time {r['heap_reuse_over_default_time']:.3f}, page faults "
                  f"{r['heap_reuse_over_default_page_faults']:.3f}.", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rollout_arguments(p)
    p.add_argument("--reps", type=int, default=2, help="updates per setting, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/host_memory_<capability tag>.json, and .md beside it)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    _results.write_and_print("host_memory", result, markdown(result), args.out)


if __name__ == "__main__":
    main()
