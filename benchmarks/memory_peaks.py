#!/usr/bin/env python
"""The estimates of `eksft.pipeline.memory` against measured peaks on CPU, with the embedded model.

Three measurements, each in a fresh process (no allocator state carried over), at the quickstart's settings and
the precision ``rl.common.precision`` resolves on this machine, with padded rows (packing off: the formulas'
micro-batch of B rows of T tokens):

* ``sft``:    one cold-start step (`eksft.sft`: the trainer worker's ``train_step`` with the ``eksft`` objective,
              its frozen reference copy), 8 rows x 256 tokens, labels from position 32;
* ``grpo``:   one GRPO update of the trainer worker (``update``: 16 completions of 48-96 tokens after 64-token
              prompts, left-padded as `rl.workers.batch` builds them), its reference copy loaded;
* ``engine``: a vLLM engine started (`rl.rollout.vllm_engine.make_llm`, the quickstart's ``kv_cache_gib`` and
              ``max_model_len``) and one generation of 8 prompts x 4 samples x 96 tokens.

Measured peak = the process's resident-set high-water mark (``VmHWM``) minus its resident set (``VmRSS``) just
before the model is built, after every import: what the estimate counts (tensors), not the Python, torch and vLLM
runtime the plan adds as ``RUNTIME_GIB``. For the trainer the high-water mark is reset after the models are
loaded (``/proc/self/clear_refs``: loading's own transient copies are not part of a training step); the sharded
state, the reference and everything the step allocates are then inside it.

    python benchmarks/memory_peaks.py                 # all three, a table; --out results/memory_peaks_<tag>.json
    python benchmarks/memory_peaks.py --child sft     # one, JSON on stdout
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
GIB = 2**30
TOLERANCE = 0.25


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss() -> int:
    return status_kib("VmRSS") * 1024


def hwm() -> int:
    return status_kib("VmHWM") * 1024


def reclaimed_pages() -> int:
    """Pages the kernel has reclaimed since boot (``pgsteal_*`` in /proc/vmstat; 0 where unreadable). Reclaim while
    a child measures can evict its file-backed pages (the mapped weights) and lower its high-water mark below the
    peak it would have on its own: such a measurement says so (``reclaimed_pages``) and a caller can repeat it."""
    try:
        lines = Path("/proc/vmstat").read_text().splitlines()
    except OSError:
        return 0
    return sum(int(line.split()[1]) for line in lines if line.startswith("pgsteal_"))


def reset_hwm() -> bool:
    """Reset the high-water mark to the current resident set (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _quickstart():
    from eksft.config import load_recipe
    from eksft.models import resolve_model_dir
    from eksft.pipeline.placement import model_shape

    recipe = load_recipe(QUICKSTART)
    return recipe, resolve_model_dir(recipe.model.name), model_shape(recipe.model.name)


def measure_sft() -> dict:
    import torch

    from eksft.models import load_tokenizer
    from eksft.pipeline.memory import MicroBatchShape, TrainerSetup, trainer_estimate
    from eksft.sft.run import worker_settings
    from eksft.sft.step import ObjectiveStepLoss, SFTMicroBatch
    from rl.common.precision import resolve_bf16
    from rl.common.token_stats import default_chunk_size
    from rl.workers import make_worker_group

    torch.set_num_threads(1)
    recipe, model_dir, shape = _quickstart()
    tokenizer = load_tokenizer(model_dir)
    rows, length, prompt = recipe.sft.batch_size, recipe.data.max_length, 32
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, shape.vocab - 100, (rows, length), generator=gen)
    ids[:, 0] = torch.arange(rows) + 1000  # no common prefix: the plain batch forward
    labels = ids.clone()
    labels[:, :prompt] = -100
    batch = SFTMicroBatch(ids.tolist(), labels.tolist())
    objective = recipe.arm("eksft").objective
    loss = ObjectiveStepLoss(objective, tokenizer.pad_token_id, with_reference=True, packed=False)  # padded rows
    bf16 = resolve_bf16(recipe.sft.bf16).dtype == "bfloat16"
    gc.collect()
    base = rss()
    group = make_worker_group(worker_settings(recipe, model_dir, with_reference=True), 1)
    loaded, load_peak = rss() - base, hwm() - base
    reset = reset_hwm()
    group.train_step([batch], loss, learning_rate=recipe.sft.learning_rate)
    measured = hwm() - base
    setup = TrainerSetup(workers=1, bf16=bf16, weight_dtype=recipe.model.dtype, reference="copy",
                         activation_checkpointing=recipe.sft.gradient_checkpointing, unsharded_accumulation=True)
    shape_mb = MicroBatchShape(rows, length, logit_positions=length - prompt, padded=False, reference_logits=True,
                               chunk_rows=default_chunk_size(shape.vocab, "cpu"))
    estimate = trainer_estimate(shape, setup, shape_mb)
    return _result("sft", measured, estimate, reset, loaded=loaded, load_peak=load_peak,
                   what=f"cold-start step, eksft objective, {rows} x {length} tokens, labels from {prompt}, "
                        f"compute {'bf16' if bf16 else 'float32'}, float32 weights, reference copy")


def measure_grpo() -> dict:
    import torch

    from eksft.pipeline.memory import MicroBatchShape, TrainerSetup, trainer_estimate
    from rl.common.precision import resolve_bf16
    from rl.common.token_stats import default_chunk_size
    from rl.workers import MicroBatch, WorkerSettings, make_worker_group

    torch.set_num_threads(1)
    recipe, model_dir, shape = _quickstart()
    rl = recipe.rl
    rows, prompt, longest = rl.micro_batch_size, 64, rl.max_new_tokens
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(longest // 2, longest + 1, (rows,), generator=gen).tolist()
    lengths[0] = longest
    prompts = [torch.randint(100, shape.vocab - 100, (prompt,), generator=gen).tolist() for _ in range(rows)]
    completions = [torch.randint(100, shape.vocab - 100, (n,), generator=gen).tolist() for n in lengths]
    advantages = torch.randn(rows, generator=gen).tolist()
    bf16 = resolve_bf16(rl.bf16).dtype == "bfloat16"
    gc.collect()
    base = rss()
    # Padded rows (packing off): what the estimate's MicroBatchShape describes
    group = make_worker_group(WorkerSettings.from_grpo(rl, model_dir=model_dir, reference_dir=model_dir,
                                                       packing="off"), 1)
    ref = group.logprobs([MicroBatch(prompts, completions, advantages)], reference=True)
    mb = MicroBatch(prompts, completions, advantages, ref_logprobs=ref)
    loaded, load_peak = rss() - base, hwm() - base
    reset = reset_hwm()
    group.update([mb], rl.policy_loss_kwargs())
    measured = hwm() - base
    setup = TrainerSetup(workers=1, bf16=bf16, weight_dtype="float32", reference="copy",
                         activation_checkpointing=rl.activation_checkpointing, unsharded_accumulation=True)
    estimate = trainer_estimate(shape, setup, MicroBatchShape(rows, prompt + longest, longest + 1,
                                                              chunk_rows=default_chunk_size(shape.vocab, "cpu")))
    return _result("grpo", measured, estimate, reset, loaded=loaded, load_peak=load_peak,
                   what=f"GRPO update, {rows} completions of {min(lengths)}-{longest} tokens after {prompt}-token "
                        f"prompts, compute {'bf16' if bf16 else 'float32'}, float32 weights, reference copy")


def measure_engine() -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    import vllm  # noqa: F401  (imported before the baseline)
    from vllm import SamplingParams

    from eksft.pipeline.memory import CPU_BLOCK_SIZE, engine_estimate
    from rl.common.precision import resolve_dtype
    from rl.rollout.vllm_engine import make_llm

    torch.set_num_threads(1)
    recipe, model_dir, shape = _quickstart()
    ro, rl = recipe.rollout, recipe.rl
    dtype = resolve_dtype(ro.dtype).dtype
    prompt = 64
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, shape.vocab - 100, (prompt,), generator=gen).tolist()
               for _ in range(rl.prompts_per_step)]
    gc.collect()
    base = rss()
    llm = make_llm(model_dir, dtype=dtype, max_model_len=ro.max_model_len, kv_cache_gib=ro.kv_cache_gib)
    started = rss() - base
    params = SamplingParams(n=rl.group_size, max_tokens=rl.max_new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    measured = hwm() - base
    estimate = engine_estimate(shape, dtype=dtype, block_size=CPU_BLOCK_SIZE, prompts=rl.prompts_per_step,
                               samples=rl.group_size, prompt_len=prompt, max_new_tokens=rl.max_new_tokens,
                               max_model_len=ro.max_model_len, kv_cache_gib=ro.kv_cache_gib,
                               batched_tokens=max(ro.max_model_len, 16384))
    return _result("engine", measured, estimate, False, loaded=started, load_peak=None,
                   what=f"vLLM engine start + generate {rl.prompts_per_step} prompts x {rl.group_size} samples x "
                        f"{rl.max_new_tokens} tokens, {dtype}, kv_cache_gib {ro.kv_cache_gib:g}")


def _result(name: str, measured: int, estimate, reset: bool, *, loaded: int, load_peak: int | None, what: str) -> dict:
    from rl.common.precision import detect_hardware

    peak = estimate.peak() + estimate.peak("host")
    return {"name": name, "what": what, "measured_bytes": measured, "estimate_bytes": peak,
            "ratio": measured / peak, "hwm_reset_after_load": reset, "after_load_bytes": loaded,
            "load_peak_bytes": load_peak, "hardware": detect_hardware("cpu").tag,
            "items": [{"name": i.name, "bytes": i.bytes, "phase": i.phase} for i in estimate.items]}


CHILDREN = {"sft": measure_sft, "grpo": measure_grpo, "engine": measure_engine}


def run_child(name: str, timeout: float = 300) -> dict:
    """The measurement ``name`` in a fresh process (its peak is that process's own, whatever runs beside it); killed
    after ``timeout`` seconds."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    child = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=timeout)
    if child.returncode != 0:
        raise RuntimeError(f"{name} failed ({child.returncode}):\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| measurement | estimate (GiB) | measured peak (GiB) | measured / estimate |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']}: {r['what']} | {r['estimate_bytes'] / GIB:.3f} | {r['measured_bytes'] / GIB:.3f} "
                     f"| {r['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", choices=sorted(CHILDREN))
    p.add_argument("--only", nargs="*", choices=sorted(CHILDREN), default=["sft", "grpo", "engine"])
    p.add_argument("--out", help="write the results as JSON (and a .md table beside it)")
    args = p.parse_args(argv)
    if args.child:
        before = reclaimed_pages()
        result = CHILDREN[args.child]()
        print(json.dumps({**result, "reclaimed_pages": reclaimed_pages() - before}))
        return 0
    rows = [run_child(name) for name in args.only]
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
        Path(args.out).with_suffix(".md").write_text(table(rows) + "\n")
    return 0 if all(abs(r["ratio"] - 1) <= TOLERANCE for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
