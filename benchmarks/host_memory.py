"""The GRPO update with glibc's malloc defaults vs `rl.common.host_memory.reusing_freed_memory`, in one process;
with ``--malloc LIBRARY``, on glibc's malloc vs another malloc preloaded (tcmalloc, jemalloc), one process each.

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

``--malloc LIBRARY``: the same update as a CPU stage of ``eksft run`` runs it (within `reusing_freed_memory`; glibc's
freed memory returned after each update), in a fresh process per malloc: glibc's, and ``LIBRARY`` in ``LD_PRELOAD``
(vLLM's CPU build asks for tcmalloc there in its log: "libtcmalloc is not found in LD_PRELOAD"; the project does not
preload one), ``--rounds`` times in alternating order, one warm-up and ``--reps`` updates each. Per update: wall
time, page faults, and the process's RSS after it (what it holds between updates, while the rollout engine runs);
per process its peak RSS and the malloc library mapped into it.

    python benchmarks/host_memory.py                      # the embedded model, 2 updates per setting
    python benchmarks/host_memory.py --model tiny:qwen2 --reps 1 --out /tmp/h.json
    python benchmarks/host_memory.py --malloc /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 --rounds 2

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

import _child  # noqa: E402
import _results  # noqa: E402
from _update_timing import add_rollout_arguments, alternate, synthetic_micro_batches, timed  # noqa: E402
from memory_peaks import rss  # noqa: E402

from rl.common import host_memory  # noqa: E402

SETTINGS = {"glibc_default": host_memory.GLIBC_SETTLED_THRESHOLDS, "heap_reuse": host_memory.HEAP_THRESHOLDS}


def set_malloc(name: str) -> None:
    """What the worker's compute calls set within (`reusing_freed_memory` reads the module attribute)."""
    host_memory.HEAP_THRESHOLDS = SETTINGS[name]
    if not host_memory.set_thresholds(*SETTINGS[name]):
        raise SystemExit(f"glibc refused the malloc setting {name}")


def update_setup(args):
    """A one-rank float32 worker group of ``args.model``, the GRPO loss settings, and the synthetic rollouts with
    their number of completion tokens."""
    from eksft.models import resolve_model_dir
    from rl.grpo.config import GRPOConfig
    from rl.workers import WorkerSettings, make_worker_group

    from transformers import AutoConfig

    model_dir = resolve_model_dir(args.model)
    group = make_worker_group(WorkerSettings(model_dir=model_dir, learning_rate=1e-6, bf16=False, packing="shared_prompt"), 1)
    batches, completion_tokens = synthetic_micro_batches(args, random.Random(args.seed),
                                                         AutoConfig.from_pretrained(model_dir).vocab_size)
    return group, GRPOConfig().policy_loss_kwargs(), batches, completion_tokens


def timed_update(group, batches, loss_settings) -> tuple[float, int]:
    """(seconds, minor page faults) of one update."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds, _ = timed(lambda: group.update(batches, loss_settings))
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def run(args) -> dict[str, Any]:
    if not sys.platform.startswith("linux"):
        raise SystemExit("glibc's malloc settings: Linux only")
    group, loss_settings, batches, completion_tokens = update_setup(args)

    def measure(name: str) -> dict[str, Any]:
        set_malloc(name)
        seconds, faults = timed_update(group, batches, loss_settings)
        return {"seconds": seconds, "page_faults": faults}

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


def mapped_malloc() -> str:
    """The file name of a malloc library mapped into this process (tcmalloc, jemalloc, mimalloc, glibc's debugging
    malloc), else ``glibc``."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        name = line.rsplit("/", 1)[-1]
        if name.startswith(("libtcmalloc", "libjemalloc", "libmimalloc", "libc_malloc_debug")):
            return name
    return "glibc"


def run_malloc_child(args) -> dict[str, Any]:
    """One process's updates on the malloc it was started with (``--malloc`` mode)."""
    group, loss_settings, batches, completion_tokens = update_setup(args)
    record: dict[str, Any] = {"malloc": mapped_malloc(), "completion_tokens": completion_tokens,
                              "seconds": [], "page_faults": [], "rss_after_mb": []}
    try:
        group.update(batches, loss_settings)  # warm-up
        for _ in range(args.reps):
            seconds, faults = timed_update(group, batches, loss_settings)
            record["seconds"].append(seconds)
            record["page_faults"].append(faults)
            record["rss_after_mb"].append(rss() >> 20)
    finally:
        group.shutdown()
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    return record


def run_malloc(args, argv: list[str]) -> dict[str, Any]:
    """``--malloc``: a fresh process per malloc library and round, in alternating order; each child gets this
    process's command line ``argv`` (the updates' shape and count; ``--child`` makes it run one process's share)."""
    from rl.common.precision import detect_hardware

    library = Path(args.malloc)
    if not library.is_file():
        raise SystemExit(f"--malloc {args.malloc}: no such file (a malloc library to preload, e.g. "
                         "libtcmalloc_minimal.so.4 from Debian's libtcmalloc-minimal4)")
    envs = {"glibc": {"LD_PRELOAD": ""}, "preloaded": {"LD_PRELOAD": str(library.resolve())}}
    runs: dict[str, list[dict]] = {name: [] for name in envs}
    for rnd in range(args.rounds):
        for name in (list(envs) if rnd % 2 == 0 else list(envs)[::-1]):
            print(f"[host_memory] {name}, round {rnd + 1}/{args.rounds}", flush=True)
            child = _child.run_child(__file__, name, argv, timeout_s=args.child_timeout, env=envs[name],
                                     echo=lambda line: line.startswith("[host_memory]"))
            if not child.ok:
                raise SystemExit(f"the {name} child failed:\n{child.log[-3000:]}")
            runs[name].append(child.result)
    out = {}
    for name, records in runs.items():
        pooled = {key: [x for r in records for x in r[key]] for key in ("seconds", "page_faults", "rss_after_mb")}
        out[name] = {"malloc": [r["malloc"] for r in records], **pooled,
                     "median_s": statistics.median(pooled["seconds"]),
                     "median_page_faults": statistics.median(pooled["page_faults"]),
                     "peak_rss_mb": [r["peak_rss_mb"] for r in records]}
    ratios = {"preloaded_over_glibc_time": out["preloaded"]["median_s"] / out["glibc"]["median_s"],
              "preloaded_over_glibc_page_faults":
                  out["preloaded"]["median_page_faults"] / max(out["glibc"]["median_page_faults"], 1),
              "preloaded_over_glibc_rss_after_update": statistics.median(out["preloaded"]["rss_after_mb"])
                                                       / statistics.median(out["glibc"]["rss_after_mb"]),
              "preloaded_over_glibc_peak_rss": statistics.median(out["preloaded"]["peak_rss_mb"])
                                               / statistics.median(out["glibc"]["peak_rss_mb"])}
    return {"benchmark": "host_memory_malloc", "config": {k: v for k, v in vars(args).items() if k not in ("child", "json_out")},
            "completion_tokens": runs["glibc"][0]["completion_tokens"],
            "hardware": detect_hardware("cpu").as_dict(), "machine": _results.cpu_machine(),
            "libraries": {name: env["LD_PRELOAD"] for name, env in envs.items()}, "malloc": out, "ratios": ratios}


def markdown_malloc(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [f"### host_memory --malloc: the GRPO update of {c['model']}, {c['groups']} groups x {c['group']} completions "
             f"({result['completion_tokens']} completion tokens), float32, packed (shared_prompt), "
             f"{result['machine']['cpu_count']} cores, {c['rounds']} rounds x (1 warm-up + {c['reps']}) updates per "
             "malloc, alternating", "",
             "| malloc | update s (median) | runs s | page faults per update | RSS after each update MB | peak RSS MB |",
             "|---|---|---|---|---|---|"]
    for name, v in result["malloc"].items():
        lines.append(f"| {name} ({', '.join(sorted(set(v['malloc'])))}) | {v['median_s']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in v['seconds'])} | {', '.join(str(x) for x in v['page_faults'])} | "
                     f"{', '.join(str(x) for x in v['rss_after_mb'])} | {', '.join(str(x) for x in v['peak_rss_mb'])} |")
    r = result["ratios"]
    lines += ["", f"preloaded ({result['libraries']['preloaded']}) / glibc: time {r['preloaded_over_glibc_time']:.3f}, "
                  f"page faults {r['preloaded_over_glibc_page_faults']:.4f}, RSS after an update "
                  f"{r['preloaded_over_glibc_rss_after_update']:.3f}, peak RSS {r['preloaded_over_glibc_peak_rss']:.3f}."]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--malloc", metavar="LIBRARY", help="glibc's malloc vs LIBRARY preloaded, a process each")
    p.add_argument("--rounds", type=int, default=2, help="--malloc: processes per malloc, alternating")
    p.add_argument("--child-timeout", type=float, default=1800)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/host_memory_<capability tag>.json, and .md beside it)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        _results.write_json(args.json_out, run_malloc_child(args))
    elif args.malloc:
        result = run_malloc(args, argv)
        _results.write_and_print("host_memory_malloc", result, markdown_malloc(result), args.out)
    else:
        result = run(args)
        _results.write_and_print("host_memory", result, markdown(result), args.out)


if __name__ == "__main__":
    main()
