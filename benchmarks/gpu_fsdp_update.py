#!/usr/bin/env python
"""One FSDP2 GRPO update, then one cold-start (EKSFT) step, of the trainer worker (`rl.workers.TrainerWorker`, world
size 1) on a random-initialised Qwen2 of Qwen2.5-0.5B's shape: per-step wall time and peak GPU memory (GPU; runs on
CPU with --tiny).

Why: the lent GPU machines have torch + transformers but no vLLM, Ray or pydantic, and the worker is the code
that trains on GPU (FSDP2 units per decoder layer, float32 master weights, bf16 compute where the precision
rule says so, float32 gradient reduction, AdamW on the shards). This runs exactly that code, without the
trainer's rollout stack: a one-rank process group (NCCL on CUDA, gloo on CPU), synthetic on-policy
micro-batches (``--sequences`` sequences of ``--prompt-len`` + ``--completion-len`` tokens, micro-batch
``--micro-batch``, random advantages, token-mean loss, no KL), ``--warmup`` untimed updates, then ``--steps``
timed ones. Peak memory: ``torch.cuda.max_memory_allocated`` over the timed updates (reset after warm-up).

The model: a transformers ``Qwen2Config`` with 0.5B's published shape (hidden 896, 24 layers, 14 heads, 2 KV
heads, intermediate 4864, vocab 151936, tied embeddings), random weights written to a temporary directory
(no download). ``--tiny``: a 2-layer small shape, for a CPU smoke test.

The cold-start step (``--no-sft`` skips it): a new worker with the frozen reference (a sharded copy), the
``eksft`` objective through `eksft.sft.step.ObjectiveStepLoss` and `TrainerWorker.train_step`, ``--sft-sequences``
sequences of ``--sft-prompt-len`` prompt + ``--sft-response-len`` trained tokens in micro-batches of
``--sft-micro-batch`` (the paper's per-GPU batch 1 x accumulation 8 by default). It needs pydantic (the objectives'
settings): without it, it is recorded as skipped.

Both steps are timed with the worker's default, one rank accumulating unsharded
(`rl.workers.trainer_worker.ONE_RANK_UNSHARDED_ACCUMULATION`: the bf16 parameters kept gathered, the gradients
summed unsharded, one reduce and reshard in the last backward), then again with it off (a reshard and a reduce
per micro-batch) into ``accumulation_off``: its time and peak memory (``--no-compare-accumulation`` skips that).

Imports: the script checks that neither ray nor vllm is imported. ``rl.grpo`` (imported by the worker for its
loss) imports pydantic through its package ``__init__``; where pydantic is missing (the GPU image), the pure
modules are loaded from their files without the packages' ``__init__`` (``--module-files`` forces that path).

Examples:
  python benchmarks/gpu_fsdp_update.py --tiny --steps 1 --out /tmp/gpu_fsdp_update_tiny.json   # CPU smoke
  python benchmarks/gpu_fsdp_update.py --out "$OUT/gpu_fsdp_update.json"                        # GPU, 0.5B
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from _gpu_common import QWEN25_05B, REPO_ROOT, TINY, load_module_file  # benchmarks/_gpu_common.py (stdlib only)

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def import_worker(module_files: bool = False):
    """(TrainerWorker, WorkerSettings, MicroBatch, resolve_bf16, how they were imported)."""
    if not module_files:
        try:
            from rl.common.precision import resolve_bf16
            from rl.workers import MicroBatch, TrainerWorker, WorkerSettings

            return TrainerWorker, WorkerSettings, MicroBatch, resolve_bf16, "package imports (rl.workers)"
        except ImportError as e:  # no pydantic: load the pure modules below
            if "pydantic" not in str(e):
                raise
            why = f"module files without package __init__ ({e})"
    else:
        why = "module files without package __init__ (--module-files)"
    for pkg in ("rl", "rl.common", "rl.grpo", "rl.workers"):
        stub = types.ModuleType(pkg)
        stub.__path__ = [str(REPO_ROOT / pkg.replace(".", "/"))]
        sys.modules[pkg] = stub
    mods = {}
    for name in ("rl.common.labels", "rl.common.token_stats", "rl.common.precision", "rl.grpo.loss",
                 "rl.workers.batch", "rl.workers.trainer_worker"):  # each after what it imports
        mods[name] = load_module_file(name, REPO_ROOT / (name.replace(".", "/") + ".py"))
    worker, batch = mods["rl.workers.trainer_worker"], mods["rl.workers.batch"]
    return worker.TrainerWorker, worker.WorkerSettings, batch.MicroBatch, mods["rl.common.precision"].resolve_bf16, why


def write_model(shape: dict, path: Path, seed: int) -> int:
    """A random-initialised Qwen2 (float32) saved to ``path``; returns its parameter count."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def micro_batches(MicroBatch, args, vocab: int, seed: int) -> list:
    """``--sequences`` on-policy sequences in micro-batches of ``--micro-batch``: groups of ``--group`` share a
    prompt; random token ids, zero-mean advantages."""
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(args.sequences):
        if i % args.group == 0:
            prompt = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
        seqs.append((prompt, torch.randint(0, vocab, (args.completion_len,), generator=gen).tolist()))
    adv = torch.randn(args.sequences, generator=gen)
    adv = ((adv - adv.mean()) / adv.std().clamp_min(1e-6)).tolist()
    out = []
    for k in range(0, len(seqs), args.micro_batch):
        chunk = seqs[k : k + args.micro_batch]
        out.append(MicroBatch([p for p, _ in chunk], [c for _, c in chunk], adv[k : k + args.micro_batch]))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer small shape (CPU smoke test)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default="auto",
                   help="bf16 compute (default auto: where the device computes bf16 natively)")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--group", type=int, default=8, help="sequences per prompt")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--completion-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--packing", default="auto", choices=["auto", "off", "shared_prompt", "padding_free"],
                   help="rl.packing of the worker's forwards (rl.common.packing)")
    p.add_argument("--sft", action=argparse.BooleanOptionalAction, default=True, help="the cold-start step too")
    p.add_argument("--sft-sequences", type=int, default=8)
    p.add_argument("--sft-micro-batch", type=int, default=1)
    p.add_argument("--sft-prompt-len", type=int, default=256)
    p.add_argument("--sft-response-len", type=int, default=2048)
    p.add_argument("--module-files", action="store_true", help="load rl's pure modules from their files (as "
                                                               "where pydantic is missing)")
    p.add_argument("--compare-accumulation", action=argparse.BooleanOptionalAction, default=True,
                   help="also time both steps with the one-rank unsharded accumulation off")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.device == "cpu":
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # stage_device() then says cpu
    if args.tiny and args.prompt_len == 256 and args.completion_len == 1024:
        args.prompt_len, args.completion_len = 16, 32
    if args.tiny and args.sft_prompt_len == 256 and args.sft_response_len == 2048:
        args.sft_prompt_len, args.sft_response_len = 16, 32

    TrainerWorker, WorkerSettings, MicroBatch, resolve_bf16, how = import_worker(args.module_files)
    from rl.workers.trainer_worker import free_port

    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    shape = TINY if args.tiny else QWEN25_05B
    result: dict = {"model": "qwen2 random, " + ("tiny shape" if args.tiny else "Qwen2.5-0.5B shape"),
                    "shape": shape, "device": device,
                    "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
                    "torch": torch.__version__, "imports": how,
                    "batch": dict(sequences=args.sequences, group=args.group, prompt_len=args.prompt_len,
                                  completion_len=args.completion_len, micro_batch=args.micro_batch)}
    import transformers

    result["transformers"] = transformers.__version__
    tmp_dir = tempfile.TemporaryDirectory()
    tmp = tmp_dir.name
    result["parameters"] = write_model(shape, Path(tmp), seed=0)
    settings = WorkerSettings(model_dir=tmp, bf16=args.bf16, learning_rate=1e-6,
                              activation_checkpointing=args.activation_checkpointing, packing=args.packing)
    worker = TrainerWorker(settings, 0, 1)
    t = time.perf_counter()
    worker.setup("127.0.0.1", free_port())
    result["setup_s"] = time.perf_counter() - t
    result["precision"] = worker.precision.describe()
    result["packing"] = worker.packing  # rl.packing as the worker resolved it for its device
    mbs = micro_batches(MicroBatch, args, shape["vocab_size"], seed=1)
    loss = dict(aggregation="token-mean", eps_low=0.2, eps_high=0.28, beta=0.0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        times, metrics = timed(lambda: worker.update(mbs, loss), args.warmup, args.steps, device, sync)
        update_peak = peak_memory_gib(device)
        if args.compare_accumulation:
            result["accumulation_off"] = accumulation_off(TrainerWorker, lambda: worker.update(mbs, loss), args,
                                                          device, sync)
    finally:
        worker.shutdown()
    tokens = args.sequences * args.completion_len
    result.update(update_s=times, update_s_median=statistics.median(times), warmup=args.warmup,
                  trained_tokens_per_update=tokens, tokens_per_s=tokens / statistics.median(times),
                  last_metrics={k: float(v) for k, v in metrics.items()}, peak_memory_gib=update_peak,
                  ray_imported="ray" in sys.modules, vllm_imported="vllm" in sys.modules,
                  pydantic_imported="pydantic" in sys.modules)
    result["sft"] = cold_start_step(args, TrainerWorker, WorkerSettings, tmp, shape, device, sync) if args.sft else "skipped (--no-sft)"
    tmp_dir.cleanup()
    result.update(ray_imported="ray" in sys.modules, vllm_imported="vllm" in sys.modules)
    if result["ray_imported"] or result["vllm_imported"]:
        raise SystemExit(f"the worker imported ray or vllm: {result['ray_imported']=}, {result['vllm_imported']=}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    peak = "n/a (CPU)" if result["peak_memory_gib"] is None else f"{result['peak_memory_gib']:.2f} GiB"
    summary = (f"gpu_fsdp_update: {result['model']} ({result['parameters'] / 1e6:.0f}M params) on {device} "
               f"[{result['precision']}], {args.sequences} x ({args.prompt_len}+{args.completion_len}) tokens, "
               f"micro-batch {args.micro_batch}, packing {result['packing']}: update {result['update_s_median']:.3f} s (median of "
               f"{args.steps}), {result['tokens_per_s']:.0f} completion tokens/s, peak memory {peak}")
    if "accumulation_off" in result:
        summary += f"; {describe_off(result['accumulation_off'])}"
    if isinstance(result["sft"], dict):
        sft = result["sft"]
        sft_peak = "n/a (CPU)" if sft["peak_memory_gib"] is None else f"{sft['peak_memory_gib']:.2f} GiB"
        summary += (f"\ncold start (eksft, reference copy): {args.sft_sequences} x ({args.sft_prompt_len}+"
                    f"{args.sft_response_len}) tokens, micro-batch {args.sft_micro_batch}: step {sft['step_s_median']:.3f} s "
                    f"(median of {args.steps}), {sft['tokens_per_s']:.0f} trained tokens/s, peak memory {sft_peak}")
        if "accumulation_off" in sft:
            summary += f"; {describe_off(sft['accumulation_off'])}"
    else:
        summary += f"\ncold start: {result['sft']}"
    out.with_suffix(".txt").write_text(summary + "\n")
    print(summary, flush=True)
    return result


def peak_memory_gib(device: str) -> float | None:
    """The peak GPU memory allocated since the last reset (`timed` resets it after the warm-up); None on a CPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def accumulation_off(TrainerWorker, step, args, device: str, sync) -> dict:
    """``step`` timed as `timed` does with the worker module's ``ONE_RANK_UNSHARDED_ACCUMULATION`` off (a reshard
    and a reduce per micro-batch), restored after: the times, their median and the peak memory."""
    module = sys.modules[TrainerWorker.__module__]  # rl.workers.trainer_worker, however it was imported
    before = module.ONE_RANK_UNSHARDED_ACCUMULATION
    module.ONE_RANK_UNSHARDED_ACCUMULATION = False
    try:
        times, _ = timed(step, args.warmup, args.steps, device, sync)
    finally:
        module.ONE_RANK_UNSHARDED_ACCUMULATION = before
    return dict(step_s=times, step_s_median=statistics.median(times), peak_memory_gib=peak_memory_gib(device))


def describe_off(off: dict) -> str:
    peak = "" if off["peak_memory_gib"] is None else f", peak memory {off['peak_memory_gib']:.2f} GiB"
    return f"accumulation off: {off['step_s_median']:.3f} s{peak}"


def timed(step, warmup: int, steps: int, device: str, sync) -> tuple[list[float], dict]:
    """``warmup`` untimed calls of ``step``, then ``steps`` timed ones (peak GPU memory reset in between): the
    times and the last call's metrics."""
    for _ in range(warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, metrics = [], {}
    for _ in range(steps):
        t = time.perf_counter()
        metrics = step()
        sync()
        times.append(time.perf_counter() - t)
    return times, metrics


def cold_start_step(args, TrainerWorker, WorkerSettings, model_dir: str, shape: dict, device: str, sync):
    """One cold-start optimizer step (eksft, the reference a sharded frozen copy) on a fresh worker: the timings and
    peak memory, or why it was skipped."""
    try:
        from eksft.objectives import EKSFTSettings
        from eksft.sft.step import ObjectiveStepLoss, SFTMicroBatch
    except ImportError as e:
        return f"skipped: {e} (the objectives' settings need pydantic)"
    from rl.workers.trainer_worker import free_port

    settings = WorkerSettings(model_dir=model_dir, reference_dir=model_dir, bf16=args.bf16, learning_rate=1e-5,
                              weight_decay=0.1, adam_betas=(0.9, 0.95),
                              activation_checkpointing=args.activation_checkpointing)
    worker = TrainerWorker(settings, 0, 1)
    worker.setup("127.0.0.1", free_port())
    gen = torch.Generator().manual_seed(2)
    rows = []
    for _ in range(args.sft_sequences):
        ids = torch.randint(0, shape["vocab_size"], (args.sft_prompt_len + args.sft_response_len,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * args.sft_prompt_len + ids[args.sft_prompt_len:]})
    mbs = [SFTMicroBatch.of(rows[k:k + args.sft_micro_batch]) for k in range(0, len(rows), args.sft_micro_batch)]
    loss = ObjectiveStepLoss(EKSFTSettings(), pad_token_id=0, with_reference=True)
    step = lambda: worker.train_step(mbs, loss, learning_rate=1e-5)  # noqa: E731
    try:
        times, metrics = timed(step, args.warmup, args.steps, device, sync)
        peak = peak_memory_gib(device)
        off = accumulation_off(TrainerWorker, step, args, device, sync) if args.compare_accumulation else None
    finally:
        worker.shutdown()
    tokens = args.sft_sequences * args.sft_response_len
    out = dict(objective="eksft (defaults), reference: sharded frozen copy", sequences=args.sft_sequences,
               micro_batch=args.sft_micro_batch, prompt_len=args.sft_prompt_len, response_len=args.sft_response_len,
               step_s=times, step_s_median=statistics.median(times), tokens_per_s=tokens / statistics.median(times),
               last_metrics={k: float(v) for k, v in metrics.items()}, peak_memory_gib=peak)
    if off is not None:
        out["accumulation_off"] = off
    return out


if __name__ == "__main__":
    main()
