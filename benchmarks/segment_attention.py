"""Segment attention with the completions in one SDPA call or in buckets of similar length.

`rl.common.packing.segment_attention` attends each packed completion to its prompt and, causally, to itself. One
SDPA call over all of a row's completions pads each to the longest: with GRPO's lengths (3 to 128 tokens in one
group) most of the query-key pairs computed are padding. `completion_buckets` cuts the completions into buckets of
similar length, one call each, minimising the padded pairs plus a fixed cost per call (`SDPA_CALL_PAIRS`, the
pairs one call's overhead is worth). This measures, in one process and alternating:

1. the attention alone (forward and backward of `segment_attention`) at the model's head shape on packed groups,
   for several call costs (0: a bucket per distinct length; "one": a single call), which is how
   `SDPA_CALL_PAIRS` was chosen;
2. the trainer worker's whole update (`TrainerWorker.update`: packed forwards, backwards, AdamW) with one call and
   with the default buckets;
3. at bf16 (``--bf16``; default auto: where the CPU computes bf16 natively), both again with bf16 rows attending in
   float32 (`CPU_ATTENTION_DTYPE`, the CPU default) and in bf16 itself, which is how that default was chosen.

Completions are drawn uniformly from ``--min-tokens`` to ``--max-tokens`` (default 3-128: `grpo_step_cpu-avx2.json`
records 3-128 with a quarter truncated at 128).

    python benchmarks/segment_attention.py
    python benchmarks/segment_attention.py --model tiny:qwen2 --reps 1 --groups 2 --out /tmp/s.json
    python benchmarks/segment_attention.py --no-bf16          # float32 only, as on a CPU without native bf16

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

import _precision  # noqa: E402
import _results  # noqa: E402
from _update_timing import (  # noqa: E402
    add_rollout_arguments, alternate, alternate_module_setting, synthetic_micro_batches, timed)

ONE_CALL = 10**15  # a call cost no split can beat: every row's completions in one SDPA call


def _cost_name(cost: int) -> str:
    return "one" if cost == ONE_CALL else str(cost)


def attention_alone(batches, config, variants: dict[str, tuple[int, Any]], reps: int, dtype) -> dict[str, Any]:
    """Forward + backward of `segment_attention` over every micro-batch's packed row (q, k, v in ``dtype``), per
    variant: ``{name: (call cost, CPU_ATTENTION_DTYPE)}``."""
    import types

    import torch

    import rl.common.packing as packing
    from rl.common.packing import SegmentLayout, pack_sequences, segment_attention

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=True)
    rows = [pack_sequences(mb.prompt_ids, mb.completion_ids) for mb in batches]
    g = torch.Generator().manual_seed(0)
    tensors = [tuple(torch.randn(1, h, row.length, head_dim, generator=g).to(dtype).requires_grad_(True)
                     for h in (heads, kv_heads, kv_heads)) for row in rows]
    layouts = {name: [SegmentLayout.of(row.segment, row.seen, call_pairs=cost) for row in rows]
               for name, (cost, _) in variants.items()}
    attention_dtype = packing.CPU_ATTENTION_DTYPE

    def measure(name: str) -> dict[str, Any]:
        packing.CPU_ATTENTION_DTYPE = variants[name][1]

        def forward_backward() -> None:
            for (q, k, v), layout in zip(tensors, layouts[name]):
                o, _ = segment_attention(module, q, k, v, None, scaling=head_dim ** -0.5, packed_layout=layout)
                o.sum().backward()
        return {"seconds": timed(forward_backward, digits=4)[0]}

    try:
        measure(next(iter(variants)))  # warm-up
        out = alternate(variants, reps, measure)
    finally:
        packing.CPU_ATTENTION_DTYPE = attention_dtype
    for name, v in out.items():
        v["calls"] = sum(len(lay.buckets) for lay in layouts[name])
        v["completion_pairs"] = sum(b.query_valid.numel() * b.key_index.shape[1]
                                    for lay in layouts[name] for b in lay.buckets)
    return out


def run(args) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig

    import rl.common.packing as packing
    from eksft.models import resolve_model_dir
    from rl.grpo.config import GRPOConfig
    from rl.workers import WorkerSettings, make_worker_group

    precision = _precision.resolve(args, "cpu")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model_dir = resolve_model_dir(args.model)
    config = AutoConfig.from_pretrained(model_dir)
    batches, completion_tokens = synthetic_micro_batches(args, random.Random(args.seed), config.vocab_size)
    default, attention_dtype = packing.SDPA_CALL_PAIRS, packing.CPU_ATTENTION_DTYPE
    costs = sorted({ONE_CALL, 0, *args.costs, default})
    alone = attention_alone(batches, config, {_cost_name(c): (c, attention_dtype) for c in costs}, args.reps, dtype)
    for name, v in alone.items():
        print(f"[segment_attention] attention alone, call cost {name}: {v['median_s']:.3f}s, {v['calls']} calls, "
              f"{v['completion_pairs']} pairs", flush=True)
    # bf16 rows: the attention in float32 (the CPU default) vs in bf16 itself, at the default call cost
    dtypes = {"float32": torch.float32, "bf16": None} if args.bf16 else {}
    alone_by_dtype = (attention_alone(batches, config, {n: (default, d) for n, d in dtypes.items()}, args.reps, dtype)
                      if dtypes else {})

    group = make_worker_group(WorkerSettings(model_dir=model_dir, learning_rate=1e-6, bf16=args.bf16,
                                             packing="shared_prompt"), 1)
    loss_settings = GRPOConfig().policy_loss_kwargs()
    cost_of = {_cost_name(c): c for c in (ONE_CALL, default)}

    def updates_with(setting: str, values: dict[str, Any], tag: str) -> dict[str, Any]:
        """The update timed per value of ``packing.<setting>`` (read by every layout / segment_attention call)."""
        return alternate_module_setting(packing, setting, values, lambda: group.update(batches, loss_settings),
                                        args.reps, tag)

    try:
        group.update(batches, loss_settings)  # warm-up
        update = updates_with("SDPA_CALL_PAIRS", cost_of, "segment_attention update, call cost")
        update_by_dtype = updates_with("CPU_ATTENTION_DTYPE", dtypes, "segment_attention update, attention in")
    finally:
        group.shutdown()
    ratios = {"attention_default_over_one_call": alone[_cost_name(default)]["median_s"] / alone["one"]["median_s"],
              "update_default_over_one_call": update[_cost_name(default)]["median_s"] / update["one"]["median_s"]}
    if dtypes:
        ratios.update(attention_float32_over_bf16=alone_by_dtype["float32"]["median_s"] / alone_by_dtype["bf16"]["median_s"],
                      update_float32_attention_over_bf16=update_by_dtype["float32"]["median_s"] / update_by_dtype["bf16"]["median_s"])
    return {"benchmark": "segment_attention", "config": vars(args), "default_call_pairs": default,
            "completion_tokens": completion_tokens, "precision": precision, "hardware": precision["hardware"],
            "machine": _results.cpu_machine(), "attention_alone": alone, "update": update,
            "attention_dtype": {"alone": alone_by_dtype, "update": update_by_dtype}, "ratios": ratios}


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [f"### segment_attention: {c['model']}, {c['groups']} groups x {c['group']} completions of "
             f"{c['min_tokens']}-{c['max_tokens']} tokens after {c['prompt_tokens']}-token prompts "
             f"({result['completion_tokens']} completion tokens), {result['machine']['cpu_count']} cores", "",
             _precision.header(result["precision"]) if "precision" in result else "Trainer: float32.", "",
             "Attention alone (forward + backward of `segment_attention`, every group's packed row):", "",
             "| call cost (pairs) | s (median) | runs s | SDPA calls for completions | completion query-key pairs |",
             "|---|---|---|---|---|"]
    for name, v in result["attention_alone"].items():
        mark = " (default)" if name == str(result["default_call_pairs"]) else ""
        lines.append(f"| {name}{mark} | {v['median_s']:.3f} | {', '.join(f'{x:.3f}' for x in v['seconds'])} | "
                     f"{v['calls']} | {v['completion_pairs']} |")
    lines += ["", "The trainer worker's update (forwards, backwards, AdamW):", "",
              "| completions | s (median) | runs s |", "|---|---|---|"]
    for name, v in result["update"].items():
        label = "one SDPA call per row" if name == "one" else f"buckets (call cost {name})"
        lines.append(f"| {label} | {v['median_s']:.2f} | {', '.join(f'{x:.2f}' for x in v['seconds'])} |")
    r = result["ratios"]
    lines += ["", f"default / one call: attention {r['attention_default_over_one_call']:.3f}, "
                  f"update {r['update_default_over_one_call']:.3f}.", ""]
    by_dtype = result.get("attention_dtype", {})
    if by_dtype.get("update"):
        lines += ["bf16 rows attending in float32 (`CPU_ATTENTION_DTYPE`, the CPU default) or in bf16, at the default "
                  "call cost:", "", "| attention in | alone s (median) | alone runs s | update s (median) | update runs s |",
                  "|---|---|---|---|---|"]
        for name, v in by_dtype["update"].items():
            a = by_dtype["alone"][name]
            lines.append(f"| {name} | {a['median_s']:.3f} | {', '.join(f'{x:.3f}' for x in a['seconds'])} | "
                         f"{v['median_s']:.2f} | {', '.join(f'{x:.2f}' for x in v['seconds'])} |")
        lines += ["", f"float32 / bf16 attention: alone {r['attention_float32_over_bf16']:.3f}, "
                      f"update {r['update_float32_attention_over_bf16']:.3f}.", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_rollout_arguments(p)
    _precision.add_precision_args(p, rollout=False)
    p.set_defaults(min_tokens=3)
    p.add_argument("--costs", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096, 16384, 65536],
                   help="call costs in pairs to time the attention alone at (0, one call and the default are added)")
    p.add_argument("--reps", type=int, default=3, help="runs per setting, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/segment_attention_<capability tag>.json, "
                                 "and .md beside it)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    _results.write_and_print("segment_attention", result, markdown(result), args.out)


if __name__ == "__main__":
    main()
