#!/usr/bin/env python
"""GRPO training step and HF-engine rollouts of a random-initialised Qwen2 of 0.5B shape (GPU; runs on CPU with --tiny).

Made for a GPU machine with torch + transformers (+ peft, accelerate) but NO vLLM, Ray, datasets or
math-verify, so it uses the pure pieces of ``rl`` rather than the GRPO trainer:

* **train**: one GRPO update on a synthetic rollout batch of ``--prompts`` x ``--group`` sequences
  (prompt ``--prompt-len`` tokens, completion lengths drawn uniformly in ``[--min-completion,
  --max-completion]``, random 0/1 rewards -> group advantages by `rl.grpo.core.group_advantages`):
  per micro-batch `rl.grpo.logprobs.completion_logprobs` (each distinct prompt once, then the
  completions on its KV cache in length buckets; log p of the completion tokens and the entropy,
  chunked over the vocabulary), `rl.grpo.core.policy_loss`
  (token-mean, global token normalisation, beta 0), backward; then grad clipping and AdamW. This is
  what `rl.grpo.trainer.GRPOTrainer._update` does for one on-policy mini-batch (without importing
  the trainer module, which needs the rollout stack). Precision modes (``--modes``): ``autocast`` = float32 weights and AdamW +
  bf16 autocast (what GRPOTrainer does), ``bf16`` = bf16 weights, gradients and AdamW state.
  Reports the median step time, completion tokens/s, peak memory. ``--layouts`` chooses how a micro-batch's
  forward is laid out: ``prompt-cache`` (`completion_logprobs` as above), ``padded`` (the trainer worker's
  `rl.workers.batch.sequence_logprobs`: one left-padded row per sequence), ``packed`` (its
  `packed_sequence_logprobs`: each group's completions in one packed row behind one copy of the prompt,
  `rl.common.packing`) and ``padding-free`` (the sequences one after another, no mask: transformers separates them
  by position ids, varlen with flash attention); micro-batches are cut in order, so they hold whole groups (or
  halves) in every layout. A packed micro-batch over `MAX_PACKED_LENGTH` runs padded: ``packed_fallbacks`` counts
  them. Each layout starts from the same weights and batch, so the first step's loss and grad norm must agree.
* **generate**: `rl.rollout.hf_engine.HFEngine` (transformers ``generate``, one call per prompt with
  n samples) on ``--gen-prompts`` prompts x ``--group`` samples x ``--gen-tokens`` new tokens, and,
  for comparison, ONE batched ``model.generate`` over all prompts x samples. A random model almost
  never samples EOS, so every completion runs to the limit. The model directory is written to a
  temporary folder with a word-level tokenizer that has one token per id (no download).

The import of `rl.rollout.hf_engine` is checked not to import vLLM. ``rl.grpo`` and ``rl.rollout``
import pydantic (their typed configs); where pydantic is missing, the pure modules
(`rl.grpo.loss`, `rl.grpo.advantages`, `rl.grpo.logprobs`, `rl.common.token_stats`) are loaded without their packages'
``__init__`` and the HF-engine part is skipped (carry pydantic wheels: see gpu_grpo_step.sh).

Examples:
  python benchmarks/gpu_grpo_step.py --tiny --device cpu --out /tmp/gpu_grpo_step_tiny.json   # CPU smoke test
  python benchmarks/gpu_grpo_step.py --out "$OUT/gpu_grpo_step.json"                           # GPU, 0.5B shape
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from typing import Any

import torch

import _results  # benchmarks/_results.py (stdlib only): the JSON record and its markdown table
from _gpu_common import QWEN25_05B, REPO_ROOT, TINY, load_module_file  # benchmarks/_gpu_common.py (stdlib only)

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


# --------------------------------------------------------------------------------------------
# Imports of the rl pieces (with or without pydantic)
# --------------------------------------------------------------------------------------------


def import_rl() -> dict[str, Any]:
    """policy_loss, group_advantages, completion_logprobs and how they were imported."""
    try:
        from rl.grpo.core import group_advantages, policy_loss
        from rl.grpo.logprobs import completion_logprobs

        from rl.workers.batch import packed_sequence_logprobs, sequence_logprobs

        how = "package imports (rl.grpo.core, rl.grpo.logprobs, rl.workers.batch)"
    except ImportError as e:  # no pydantic: load the pure modules without rl.grpo/__init__ (which imports config)
        if "pydantic" not in str(e):
            raise
        for pkg in ("rl", "rl.common", "rl.grpo", "rl.workers"):
            stub = types.ModuleType(pkg)
            stub.__path__ = [str(REPO_ROOT / pkg.replace(".", "/"))]
            sys.modules[pkg] = stub
        for name in ("labels", "token_stats", "packing"):  # what rl.grpo.logprobs and rl.workers.batch import
            load_module_file(f"rl.common.{name}", REPO_ROOT / "rl" / "common" / f"{name}.py")
        batch = load_module_file("rl.workers.batch", REPO_ROOT / "rl" / "workers" / "batch.py")
        sequence_logprobs, packed_sequence_logprobs = batch.sequence_logprobs, batch.packed_sequence_logprobs
        logprobs = load_module_file("rl.grpo.logprobs", REPO_ROOT / "rl" / "grpo" / "logprobs.py")
        loss = load_module_file("rl.grpo.loss", REPO_ROOT / "rl" / "grpo" / "loss.py")
        advantages = load_module_file("rl.grpo.advantages", REPO_ROOT / "rl" / "grpo" / "advantages.py")
        policy_loss, group_advantages = loss.policy_loss, advantages.group_advantages
        completion_logprobs = logprobs.completion_logprobs
        how = f"module files without package __init__ ({e})"
    return {"policy_loss": policy_loss, "group_advantages": group_advantages,
            "completion_logprobs": completion_logprobs, "sequence_logprobs": sequence_logprobs,
            "packed_sequence_logprobs": packed_sequence_logprobs, "how": how}


def import_hf_engine():
    """(HFEngine class, note); checks that importing it pulls in no vLLM."""
    before = "vllm" in sys.modules
    from rl.rollout.hf_engine import HFEngine

    return HFEngine, {"vllm_imported_by_hf_engine": ("vllm" in sys.modules) and not before}


# --------------------------------------------------------------------------------------------
# Model, batch, step
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(args, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = dict(TINY if args.tiny else QWEN25_05B)
    if args.num_layers:
        shape["num_hidden_layers"] = args.num_layers
    config = Qwen2Config(**shape, eos_token_id=0, pad_token_id=0, bos_token_id=None)
    config._attn_implementation = args.attn
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    return model


def synthetic_batch(args, vocab: int) -> list[dict]:
    """Rollout-like sequences: prompt ids, completion ids (lengths uniform in the range), group rewards."""
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for p in range(args.prompts):
        prompt = torch.randint(1, vocab, (args.prompt_len,), generator=g).tolist()
        for _ in range(args.group):
            n = int(torch.randint(args.min_completion, args.max_completion + 1, (1,), generator=g))
            rows.append({"prompt_ids": prompt, "completion_ids": torch.randint(1, vocab, (n,), generator=g).tolist(),
                         "reward": float(torch.rand((), generator=g) < 0.5), "group": p})
    return rows


def micro_batch_logprobs(rl, layout: str, model, chunk, autocast_dtype):
    """(logp, entropy, mask) of one micro-batch in the given layout."""
    if layout == "prompt-cache":
        return rl["completion_logprobs"](model, chunk, 1.0, with_entropy=True, autocast_dtype=autocast_dtype)
    device_type = next(model.parameters()).device.type
    amp = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    prompts, completions = [c.prompt_ids for c in chunk], [c.completion_ids for c in chunk]
    with amp:
        if layout == "padded":
            return rl["sequence_logprobs"](model, prompts, completions, 1.0, with_entropy=True)
        return rl["packed_sequence_logprobs"](model, prompts, completions, 1.0, with_entropy=True,
                                              layout="padding_free" if layout == "padding-free" else "shared_prompt")


def positions_computed(layout: str, rows: list[dict], micro: int) -> tuple[int, int]:
    """(positions the forwards of one update compute in ``layout``, the LM head aside; packed micro-batches that ran
    padded because they exceed MAX_PACKED_LENGTH)."""
    from rl.common.packing import MAX_PACKED_LENGTH, packed_length

    total = fallbacks = 0
    for start in range(0, len(rows), micro):
        chunk = rows[start:start + micro]
        padded = len(chunk) * max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in chunk)
        if layout in ("packed", "padding-free"):
            length = packed_length([r["prompt_ids"] for r in chunk], [r["completion_ids"] for r in chunk],
                                   layout == "packed")
            fallbacks += length > MAX_PACKED_LENGTH
            total += padded if length > MAX_PACKED_LENGTH else length
        elif layout == "padded":
            total += len(chunk) * max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in chunk)
        else:  # each distinct prompt once, then the completions but their last token (padded per bucket: ignored)
            prompts = {tuple(r["prompt_ids"]) for r in chunk}
            total += sum(map(len, prompts)) + sum(max(len(r["completion_ids"]) - 1, 0) for r in chunk)
    return total, fallbacks


def grpo_update(rl, model, optimizer, rows, advantages, args, device, autocast_dtype,
                layout: str = "prompt-cache") -> dict[str, float]:
    n_tokens = sum(len(r["completion_ids"]) for r in rows)
    optimizer.zero_grad(set_to_none=True)
    metrics: dict[str, float] = {}
    for start in range(0, len(rows), args.micro_batch):
        chunk = [types.SimpleNamespace(**r) for r in rows[start:start + args.micro_batch]]  # .prompt_ids, ...
        logp, entropy, mask = micro_batch_logprobs(rl, layout, model, chunk, autocast_dtype)
        loss, m = rl["policy_loss"](logp, logp.detach(), advantages[start:start + len(chunk)].to(device), mask,
                                    eps_low=0.2, eps_high=0.2, entropy=entropy, aggregation="token-mean",
                                    max_response_len=args.max_completion, num_tokens=n_tokens, num_seqs=len(rows))
        loss.backward()
        metrics["loss"] = metrics.get("loss", 0.0) + float(loss.detach())
        metrics["entropy"] = float(m["entropy"])
    metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    optimizer.step()
    return metrics


def run_train(args, device: torch.device, rl, mode: str, layout: str = "prompt-cache") -> dict[str, Any]:
    weights = torch.bfloat16 if mode == "bf16" else torch.float32
    autocast_dtype = torch.bfloat16 if mode == "autocast" else None
    if device.type == "cpu" and mode == "autocast":
        autocast_dtype = torch.bfloat16
    model = build_model(args, device, weights)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rows = synthetic_batch(args, model.config.vocab_size)
    rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float32).view(args.prompts, args.group)
    advantages = rl["group_advantages"](rewards, normalize_std=True).flatten()
    # AdamW state exists before the first timed step (a first step allocates it)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    times, last, first = [], {}, None
    for i in range(args.warmup + args.steps):
        sync(device)
        t = time.perf_counter()
        last = grpo_update(rl, model, optimizer, rows, advantages, args, device, autocast_dtype, layout)
        first = first or dict(last)
        sync(device)
        dt = time.perf_counter() - t
        if i >= args.warmup:
            times.append(dt)
        print(f"[train/{mode}/{layout}] step {i + 1}: {dt:.3f}s loss {last['loss']:.4g} grad_norm {last['grad_norm']:.3g}",
              flush=True)
    n_tokens = sum(len(r["completion_ids"]) for r in rows)
    positions, fallbacks = positions_computed(layout, rows, args.micro_batch)
    total_tokens = sum(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
    out = {
        "mode": mode, "layout": layout, "status": "ok",
        "positions_computed": positions, "packed_fallbacks": fallbacks,
        "first_step_metrics": first,
        "weights": str(weights).replace("torch.", ""), "autocast": str(autocast_dtype).replace("torch.", ""),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "sequences": len(rows), "completion_tokens": n_tokens, "total_tokens": total_tokens,
        "step_time_s": statistics.median(times), "step_times_s": times,
        "completion_tokens_per_s": n_tokens / statistics.median(times),
        "last_metrics": last,
    }
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_mem_delta_mb"] = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**20
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------
# Generation with the HF engine
# --------------------------------------------------------------------------------------------


def save_model_dir(args, target: Path, dtype: torch.dtype) -> None:
    """Random Qwen2 + a word-level tokenizer with one token per id, saved as an HF model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    model = build_model(args, torch.device("cpu"), dtype)
    vocab = model.config.vocab_size
    core = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="t0", pad_token="t0", unk_token="t1")
    model.generation_config = GenerationConfig(eos_token_id=0, pad_token_id=0)
    model.save_pretrained(target, safe_serialization=True)
    tok.save_pretrained(target)


def run_generate(args, device: torch.device) -> dict[str, Any]:
    from rl.rollout.base import SamplingConfig

    HFEngine, note = import_hf_engine()
    dtype = torch.bfloat16 if args.gen_dtype == "bfloat16" else torch.float32
    with tempfile.TemporaryDirectory(prefix="gpu_grpo_model_") as tmp:
        t = time.perf_counter()
        save_model_dir(args, Path(tmp), dtype)
        save_s = time.perf_counter() - t
        engine = HFEngine(tmp, dtype=args.gen_dtype, device=device.type, seed=args.seed)
        vocab = engine.model.config.vocab_size
        g = torch.Generator().manual_seed(args.seed + 1)
        prompts = [torch.randint(1, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.gen_prompts)]
        sampling = SamplingConfig(n=args.group, temperature=1.0, top_p=1.0, max_new_tokens=args.gen_tokens)
        engine.generate(prompts[:1], SamplingConfig(n=2, temperature=1.0, max_new_tokens=4), [0])  # warm-up
        sync(device)
        t = time.perf_counter()
        out = engine.generate(prompts, sampling, list(range(len(prompts))))
        sync(device)
        engine_s = time.perf_counter() - t
        engine_tokens = sum(len(s.completion_ids) for group in out for s in group)
        sample_ok = all(len(s.logprobs) == len(s.completion_ids) for group in out for s in group)
        # One batched generate over all prompts x samples (prompts have equal length: no padding needed).
        batch = torch.tensor([p for p in prompts for _ in range(args.group)], device=device)
        with torch.no_grad():
            torch.manual_seed(args.seed)
            sync(device)
            t = time.perf_counter()
            seqs = engine.model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=True,
                                         temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.gen_tokens,
                                         pad_token_id=0)
            sync(device)
            batched_s = time.perf_counter() - t
        batched_tokens = int((seqs[:, args.prompt_len:] != 0).sum())
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        engine.shutdown()
    return {
        "status": "ok", "dtype": args.gen_dtype, "prompts": args.gen_prompts, "samples": args.group,
        "max_new_tokens": args.gen_tokens, "model_save_s": save_s, **note,
        "hf_engine": {"seconds": engine_s, "tokens": engine_tokens, "tokens_per_s": engine_tokens / engine_s,
                      "logprobs_per_token": sample_ok},
        "batched_generate": {"seconds": batched_s, "tokens": batched_tokens,
                             "tokens_per_s": batched_tokens / batched_s},
        "hf_engine_over_batched_tokens_per_s": (engine_tokens / engine_s) / (batched_tokens / batched_s),
        "peak_mem_mb": peak,
    }


# --------------------------------------------------------------------------------------------


def _first(r: dict) -> str:
    m = r.get("first_step_metrics") or {}
    return f"{m['loss']:.6g}, {m['grad_norm']:.6g}" if "loss" in m else "-"


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [f"### gpu_grpo_step: random Qwen2 {'tiny' if c['tiny'] else '0.5B shape'}, {result['device']}, "
             f"torch {result['torch']}, transformers {result['transformers']}", "",
             f"GRPO update: {c['prompts']} prompts x {c['group']} samples, prompt {c['prompt_len']} tokens, "
             f"completions {c['min_completion']}-{c['max_completion']} tokens, micro-batch {c['micro_batch']}, "
             f"{c['steps']} timed steps after {c['warmup']} warm-up.", "",
             "| mode | layout | step s (median) | completion tokens/s | positions computed | first step loss, grad norm "
             "| peak MiB | peak delta MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["train"]:
        layout = r.get("layout", "prompt-cache")
        if r.get("status") != "ok":
            lines.append(f"| {r['mode']} | {layout} | {r.get('status')}: {r.get('error', '')[:80]} | | | | | |")
            continue
        pk = r.get("peak_mem_mb")
        dl = r.get("peak_mem_delta_mb")
        lines.append(f"| {r['mode']} | {layout} | {r['step_time_s']:.3f} | {r['completion_tokens_per_s']:.0f} | "
                     f"{r.get('positions_computed', '-')} ({r.get('packed_fallbacks', 0)} ran padded) | "
                     f"{_first(r)} | "
                     f"{'-' if pk is None else f'{pk:.0f}'} | {'-' if dl is None else f'{dl:.0f}'} |")
    g = result.get("generate") or {}
    if g.get("status") == "ok":
        lines += ["", f"Generation ({g['dtype']}, {g['prompts']} prompts x {g['samples']} samples x {g['max_new_tokens']} "
                      f"tokens): HFEngine {g['hf_engine']['tokens_per_s']:.0f} tok/s "
                      f"({g['hf_engine']['seconds']:.1f} s), one batched generate "
                      f"{g['batched_generate']['tokens_per_s']:.0f} tok/s ({g['batched_generate']['seconds']:.1f} s); "
                      f"vLLM imported by hf_engine: {g['vllm_imported_by_hf_engine']}"]
    elif g:
        lines += ["", f"Generation: {g.get('status')}: {g.get('error', '')[:200]}"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny shape (CPU smoke test)")
    p.add_argument("--num-layers", type=int, default=0, help="override the layer count")
    p.add_argument("--device", default="auto")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    p.add_argument("--modes", default="autocast,bf16", help="precision modes of the update: autocast, bf16, fp32")
    p.add_argument("--layouts", default="prompt-cache,padded,packed,padding-free",
                   help="forward layouts of the update: prompt-cache, padded, packed, padding-free (module docstring)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--min-completion", type=int, default=128)
    p.add_argument("--max-completion", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gen", action=argparse.BooleanOptionalAction, default=True, help="time the HF engine")
    p.add_argument("--gen-prompts", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--gen-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT") or str(REPO_ROOT / "benchmarks" / "results"),
                                                 "gpu_grpo_step.json"))
    args = p.parse_args(argv)
    if args.tiny:
        for k, v in dict(prompt_len=16, min_completion=4, max_completion=24, micro_batch=4, steps=2, warmup=1,
                         gen_tokens=8, prompts=2, group=4, gen_prompts=2).items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    return args


def main(argv=None) -> int:
    import transformers

    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    rl = import_rl()
    print(f"[setup] device {device}, rl imported via {rl['how']}", flush=True)
    result: dict[str, Any] = {
        "benchmark": "gpu_grpo_step", "config": vars(args), "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "rl_import": rl["how"], "train": [], "generate": None,
    }
    ok = True
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    for mode, layout in [(m.strip(), x) for m in args.modes.split(",") if m.strip() for x in layouts]:
        try:
            result["train"].append(run_train(args, device, rl, mode, layout))
        except Exception as e:  # an OOM in one mode is a result, not the end of the run
            ok = False
            traceback.print_exc()
            result["train"].append({"mode": mode, "layout": layout,
                                    "status": "oom" if "out of memory" in str(e) else "failed",
                                    "error": f"{type(e).__name__}: {e}"[:2000]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
        _results.write_json(args.out, result)  # partial results survive a later crash
    if args.gen:
        try:
            import pydantic  # noqa: F401  (rl.rollout.base needs it)

            result["generate"] = run_generate(args, device)
        except ImportError as e:
            result["generate"] = {"status": "skipped", "error": f"{e} (carry pydantic wheels)"}
        except Exception as e:
            ok = False
            traceback.print_exc()
            result["generate"] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
    table = markdown(result)
    _results.write_results(args.out, result, table)
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
