#!/usr/bin/env python
"""The time to send a trainer's full weights to two vLLM engines (Ray actors) through vLLM's weight-transfer API,
per backend, on a random-initialised Qwen3 of Qwen3-1.7B's shape (GPU; runs on CPU with --tiny).

Why: GRPO sends the trainer's weights to every rollout engine after each update (`rl.rollout.weight_transfer`:
vLLM's ``trainer_init`` / ``send_weights``). On a GPU machine that is ``nccl`` (engines on GPUs of their own) or
``ipc`` (engines on the trainer's GPU); neither runs on the CPU machines, where only ``cpu_gloo`` is tested. This
runs the project's own pieces (``RayEngine`` for the engine actors, ``TransferTarget`` / ``WeightStream`` /
``trainer_transfer`` for the trainer side) with a real model's size, and checks that the engines then serve the
trainer's weights.

What, per backend of ``--backends`` (default ``nccl,ipc``; ``cpu_gloo`` with --tiny):

1. Skipped, with the reason recorded, where it cannot run: ``nccl`` needs 1 + ``--engines`` GPUs (the trainer on
   GPU 0, each engine a Ray actor with one GPU of its own: Ray sees only the other GPUs); ``ipc`` needs a GPU (the
   engines are Ray actors with ``--ipc-gpu-fraction`` of the trainer's GPU each and a ``--kv-cache-gib`` KV cache).
2. The engines are built (``RayEngine("vllm", ..., num_engines=2, weight_transfer=BACKEND)``) before the trainer
   takes its GPU memory (vLLM's start-up check wants ``gpu_memory_utilization`` of the GPU free), then the trainer:
   a transformers model on the trainer's device (cuda:0; CPU with --tiny) in ``--trainer-dtype``, whose state dict
   is the ``WeightStream`` (the tied ``lm_head.weight`` left out: the engine ties it itself; tensors cast to the
   engines' dtype on the way, on the trainer's device for nccl/ipc, on CPU for cpu_gloo).
3. ``trainer_transfer`` (vLLM's factory) joins the engines; one untimed ``send_weights()`` (warm-up), then
   ``--repeats`` timed ones: seconds, bytes (one copy of the weights in the engines' dtype, the tied head once) and
   GB/s (bytes / seconds: the trainer sends each byte once, to both engines).
4. Correctness: before the last timed send every floating tensor of the trainer gets seeded noise
   (``--noise`` x its mean |value|); the engines are sampled once before that send (``stale``: the old weights)
   and once after it, on each actor directly, with fixed seeds; each sample's tokens are scored by the trainer
   (log_softmax of its logits in float32, temperature 1) and each engine's mean |trainer - engine| log-prob gap is
   recorded, with the stale gap to show the check can fail. CPU float32: the gap is < 1e-3 (the test asserts it);
   on a GPU with bfloat16 engines and a float32 trainer it includes bfloat16 rounding and should be far below the
   stale gap.
5. JSON (``--out``; a ``.txt`` summary next to it): shape, parameter counts, per backend the timings, bytes,
   GB/s, gaps or the reason it was skipped or failed; torch / vLLM / Ray versions, the device. A backend that
   fails is recorded and the next one still runs; the exit status is then 1.

Examples:
  python benchmarks/gpu_weight_transfer.py --tiny --repeats 2 --out /tmp/gpu_weight_transfer_tiny.json   # CPU smoke
  python benchmarks/gpu_weight_transfer.py --out "$OUT/gpu_weight_transfer.json"          # GPU, Qwen3-1.7B shape
  python benchmarks/gpu_weight_transfer.py --backends ipc --repeats 5 --out "$OUT/ipc.json"
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from _gpu_common import REPO_ROOT, TINY  # benchmarks/_gpu_common.py (stdlib only)

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Qwen3-1.7B's published shape (tied embeddings): a real model's transfer size without its weights.
QWEN3_17B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rope_theta=1000000, rms_norm_eps=1e-6, tie_word_embeddings=True)
ENGINES = 2
PROMPTS = ["Calculate 3 + 4.", "Name a prime number larger than 10.", "Write one word that rhymes with cat.",
           "What is the capital of France?"]


def require_vllm_and_ray() -> dict:
    """The versions of vllm and ray; exits with a clear message where either is missing."""
    try:
        import ray
        import vllm
    except ImportError as e:
        raise SystemExit(f"this script needs vllm and ray: {e} (the GPU image has neither: install them there, "
                         "or run where they are)") from None
    return {"vllm": vllm.__version__, "ray": ray.__version__}


def write_model(shape: dict, path: Path, save_dtype: torch.dtype, device: str, seed: int) -> int:
    """A random-initialised Qwen3 of ``shape`` saved to ``path`` in ``save_dtype``, with the project's offline
    tokenizer (`eksft.models.tiny.build_tokenizer`: byte-level, ChatML; smaller than the model's vocabulary, which
    vLLM accepts). Returns the parameter count (a tied head is the embedding: counted once)."""
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    from eksft.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen3Config(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):  # on the GPU: 1.7B parameters initialise in seconds there
        model = AutoModelForCausalLM.from_config(config, dtype=save_dtype)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    count = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return count


def tied_duplicates(model) -> set[str]:
    """State-dict names that are another parameter (a tied head), as `TrainerWorker._tied_duplicates`."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in model.named_parameters()}


def weight_stream_fns(model, to_cpu: bool):
    """(metadata_fn, iter_fn) of ``model``'s state dict without its tied duplicates, in state-dict order, as
    `TrainerWorker.weight_metadata` / `iter_full_weights(skip_tied=True)` name them. ``to_cpu``: CPU copies
    (cpu_gloo); otherwise the tensors on the trainer's device (nccl and ipc send CUDA tensors)."""
    skipped = tied_duplicates(model)

    def metadata():
        return [(name, t.dtype, tuple(t.shape)) for name, t in model.state_dict().items() if name not in skipped]

    def items():
        for name, t in model.state_dict().items():
            if name not in skipped:
                yield name, (t.detach().to("cpu", copy=True) if to_cpu else t.detach())

    return metadata, items


def payload_bytes(metadata, engine_dtype: torch.dtype) -> int:
    """Bytes of one copy of the weights as sent: floating tensors in the engines' dtype."""
    def itemsize(dtype: torch.dtype) -> int:
        return torch.empty(0, dtype=engine_dtype if dtype.is_floating_point else dtype).element_size()

    return sum(torch.Size(shape).numel() * itemsize(dtype) for _, dtype, shape in metadata)


@torch.no_grad()
def trainer_logprobs(model, samples) -> list[list[float]]:
    """Each sample's completion tokens under ``model``: log_softmax of its logits in float32 (temperature 1)."""
    device = next(model.parameters()).device
    out = []
    for s in samples:
        if not s.completion_ids:
            out.append([])
            continue
        ids = torch.tensor([s.prompt_ids + s.completion_ids], device=device)
        logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(s.completion_ids, device=device)
        out.append(logp.gather(-1, target[:, None])[:, 0].tolist())
    return out


def mean_gap(model, groups) -> tuple[float, int]:
    """(mean |trainer - engine| log-prob over every sampled token, tokens)."""
    samples = [s for group in groups for s in group]
    total, tokens = 0.0, 0
    for s, lps in zip(samples, trainer_logprobs(model, samples)):
        total += sum(abs(a - b) for a, b in zip(lps, s.logprobs))
        tokens += len(lps)
    return total / max(tokens, 1), tokens


@torch.no_grad()
def perturb(model, scale: float, seed: int) -> None:
    """Every floating tensor += N(0, 1) x ``scale`` x its mean |value| (seeded; the tied head moves with the
    embedding)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for p in model.parameters():
        if p.is_floating_point():
            noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
            p.add_((noise * scale * p.float().abs().mean().clamp_min(1e-3)).to(p.dtype))


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def skip_reason(backend: str, cuda_gpus: int, engines: int) -> str | None:
    if backend == "cpu_gloo":
        return None
    if backend == "nccl":
        if cuda_gpus < 1 + engines:
            return (f"nccl needs {1 + engines} GPUs (the trainer on GPU 0, one per engine), this machine has "
                    f"{cuda_gpus}")
        return None
    if backend == "ipc":
        return None if cuda_gpus >= 1 else "ipc needs a GPU (the engines share the trainer's GPU), none here"
    return f"unknown backend {backend!r} (nccl, ipc, cpu_gloo)"


@contextlib.contextmanager
def ray_for(backend: str, args, cuda_gpus: int):
    """A local Ray for one backend: on a GPU it sees only the engines' GPUs (``nccl``: every GPU but the
    trainer's; ``ipc``: the trainer's), through CUDA_VISIBLE_DEVICES at ``ray.init`` (this process's CUDA is
    already initialised with every GPU). Ray is shut down after the backend."""
    import ray

    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    init = dict(num_cpus=args.ray_cpus or os.cpu_count(), include_dashboard=False,
                log_to_driver=not args.quiet_engines)
    if backend in ("nccl", "ipc"):
        physical = before.split(",") if before else [str(i) for i in range(cuda_gpus)]
        visible = physical[1:] if backend == "nccl" else physical[:1]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible)
        init["num_gpus"] = len(visible)
    else:
        init["num_gpus"] = 0
    try:
        ray.init(**init)
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
    try:
        yield ray
    finally:
        ray.shutdown()


def run_backend(backend: str, args, model_dir: str, device: str, cuda_gpus: int, prompt_ids) -> dict:
    """One backend end to end; its result entry (raises on failure)."""
    from transformers import AutoModelForCausalLM

    from rl.rollout.base import SamplingConfig
    from rl.rollout.ray_engine import RayEngine
    from rl.rollout.weight_transfer import WeightStream, trainer_transfer

    on_gpu = backend in ("nccl", "ipc")
    num_gpus = {"nccl": 1, "ipc": args.ipc_gpu_fraction}.get(backend, 0)
    entry: dict = {"skipped": None, "error": None, "engine_num_gpus": num_gpus, "engine_num_cpus": args.engine_cpus}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with ray_for(backend, args, cuda_gpus) as ray:
        t = time.perf_counter()
        # num_cpus explicit: RayEngine's default may become a token share of the caller's CPUs
        extra = {} if args.gpu_memory_utilization is None else {"gpu_memory_utilization": args.gpu_memory_utilization}
        engines = RayEngine("vllm", model_dir, num_engines=args.engines, num_cpus=args.engine_cpus,
                            num_gpus=num_gpus, weight_transfer=backend, dtype=args.engine_dtype,
                            max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib, **extra)
        transfer = model = source = metadata_fn = iter_fn = None
        try:
            ray.get([a.dtype.remote() for a in engines.actors])  # every engine up
            entry["engine_start_s"] = time.perf_counter() - t
            target = engines.transfer_target(int(args.bucket_mb * 2**20))
            engine_dtype = getattr(torch, target.dtype)
            entry.update(engine_dtype=target.dtype, bucket_bytes=target.bucket_bytes)

            # the trainer after the engines: vLLM's start-up check wants most of the GPU free (ipc)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.trainer_dtype))
            model = model.to(device if on_gpu else "cpu").eval()
            metadata_fn, iter_fn = weight_stream_fns(model, to_cpu=not on_gpu)
            source = WeightStream(metadata_fn, iter_fn, engine_dtype)
            meta = metadata_fn()
            entry.update(tensors=len(meta), parameters_sent=sum(torch.Size(s).numel() for _, _, s in meta),
                         bytes=payload_bytes(meta, engine_dtype))

            t = time.perf_counter()
            transfer = trainer_transfer(target, 0, source)
            entry["trainer_init_s"] = time.perf_counter() - t
            entry["trainer_engine"] = type(transfer).__name__

            t = time.perf_counter()
            transfer.send_weights()  # warm-up: buffers, communicators, the engines' first reload
            sync()
            entry["warmup_s"] = time.perf_counter() - t

            sampling = SamplingConfig(n=args.samples, temperature=1.0, max_new_tokens=args.max_new_tokens)
            seeds = list(range(100, 100 + len(prompt_ids)))
            seconds, stale = [], []
            for i in range(args.repeats):
                if i == args.repeats - 1:  # the last send carries weights the engines have never seen
                    perturb(model, args.noise, seed=1234)
                    sync()
                    stale = [ray.get(a.generate.remote(prompt_ids, sampling, seeds)) for a in engines.actors]
                t = time.perf_counter()
                transfer.send_weights()
                sync()
                seconds.append(time.perf_counter() - t)
            fresh = [ray.get(a.generate.remote(prompt_ids, sampling, seeds)) for a in engines.actors]
            gaps = [mean_gap(model, groups) for groups in fresh]
            stale_gaps = [mean_gap(model, groups)[0] for groups in stale]
            median = statistics.median(seconds)
            entry.update(seconds=seconds, seconds_median=median, gb_per_s=entry["bytes"] / median / 1e9,
                         reported_bytes=getattr(transfer, "last_bytes", None),
                         gaps=[g for g, _ in gaps], scored_tokens=[n for _, n in gaps], stale_gaps=stale_gaps,
                         noise=args.noise, trainer_dtype=args.trainer_dtype)
        finally:
            if transfer is not None:
                with contextlib.suppress(Exception):
                    transfer.shutdown()
            # the trainer's GPU memory back before the next backend's engines start (the stream holds the model)
            transfer = model = source = metadata_fn = iter_fn = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            try:
                engines.shutdown()
            except Exception as e:  # recorded; it must not hide an error of the run itself
                entry["shutdown_error"] = repr(e)
    return entry


def summary_table(result: dict) -> str:
    lines = [f"gpu_weight_transfer: {result['model']} ({result['parameters'] / 1e6:.1f}M parameters, the tied head "
             f"once) to {result['engines']} engines, trainer on {result['device']} ({result['device_name']})",
             "| backend | sends (s) | median (s) | GB | GB/s | gap per engine | stale gap |",
             "|---|---|---:|---:|---:|---|---|"]
    for name, b in result["backends"].items():
        if b.get("skipped") or b.get("error"):
            why = f"skipped: {b['skipped']}" if b.get("skipped") else f"FAILED: {b['error'].splitlines()[-1]}"
            lines.append(f"| {name} | {why} | | | | | |")
            continue
        lines.append(f"| {name} | {', '.join(f'{s:.3f}' for s in b['seconds'])} | {b['seconds_median']:.3f} | "
                     f"{b['bytes'] / 1e9:.3f} | {b['gb_per_s']:.2f} | {', '.join(f'{g:.2e}' for g in b['gaps'])} | "
                     f"{', '.join(f'{g:.2e}' for g in b['stale_gaps'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer small shape, backend cpu_gloo (CPU smoke test)")
    p.add_argument("--backends", default=None, help="comma-separated (default nccl,ipc; cpu_gloo with --tiny)")
    p.add_argument("--engines", type=int, default=ENGINES)
    p.add_argument("--repeats", type=int, default=3, help="timed sends after the untimed warm-up")
    p.add_argument("--bucket-mb", type=float, default=64.0, help="weight-transfer bucket (MiB)")
    p.add_argument("--engine-dtype", default=None, help="default bfloat16 on GPU, float32 with --tiny")
    p.add_argument("--trainer-dtype", default="float32", help="the trainer model's dtype (its master weights)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-gib", type=float, default=None, help="per engine (default 2 on GPU, 0.25 --tiny)")
    p.add_argument("--ipc-gpu-fraction", type=float, default=0.25, help="ipc: each engine actor's num_gpus")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="passed to vllm.LLM when given (vLLM's start-up check wants this fraction of the GPU free, "
                        "even with an explicit KV cache size); needs a VLLMEngine that forwards extra kwargs")
    p.add_argument("--engine-cpus", type=float, default=None, help="each engine actor's num_cpus (default 1; "
                                                                    "0.5 with --tiny)")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray (default: this machine's)")
    p.add_argument("--samples", type=int, default=2, help="samples per prompt for the correctness check")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--noise", type=float, default=0.1, help="perturbation before the last send (x mean |w|)")
    p.add_argument("--model-dir", default=None, help="where to write the random model (default: a temporary "
                                                     "directory, removed at the end)")
    p.add_argument("--quiet-engines", action="store_true", help="do not forward the engine actors' logs")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    versions = require_vllm_and_ray()

    cuda_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = "cuda" if cuda_gpus and not args.tiny else "cpu"
    if device == "cuda":
        torch.cuda.set_device(0)
        torch.zeros(1, device="cuda")  # CUDA initialised with every GPU before Ray's CUDA_VISIBLE_DEVICES games
    backends = (args.backends or ("cpu_gloo" if args.tiny else "nccl,ipc")).split(",")
    args.engine_dtype = args.engine_dtype or ("float32" if args.tiny or device == "cpu" else "bfloat16")
    args.kv_cache_gib = args.kv_cache_gib or (0.25 if args.tiny else 2.0)
    args.engine_cpus = args.engine_cpus or (0.5 if args.tiny else 1.0)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")

    import transformers

    shape = TINY if args.tiny else QWEN3_17B
    result: dict = {"model": "qwen3 random, " + ("tiny shape" if args.tiny else "Qwen3-1.7B shape"), "shape": shape,
                    "device": device, "gpus": cuda_gpus,
                    "device_name": torch.cuda.get_device_name(0) if device == "cuda" else cpu_name(),
                    "torch": torch.__version__, "transformers": transformers.__version__, **versions,
                    "engines": args.engines, "repeats": args.repeats, "engine_dtype": args.engine_dtype,
                    "trainer_dtype": args.trainer_dtype, "bucket_mb": args.bucket_mb,
                    "max_model_len": args.max_model_len, "kv_cache_gib": args.kv_cache_gib,
                    "gpu_memory_utilization": args.gpu_memory_utilization, "backends": {}}
    tmp_dir = None
    if args.model_dir is None:
        tmp_dir = tempfile.TemporaryDirectory(prefix="gpu_weight_transfer_")
        model_dir = tmp_dir.name
    else:
        model_dir = args.model_dir
        Path(model_dir).mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    result["parameters"] = write_model(
        shape, Path(model_dir), getattr(torch, args.engine_dtype), device, seed=0)
    result["write_model_s"] = time.perf_counter() - t

    from transformers import AutoTokenizer

    from rl.rollout.base import prompt_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = prompt_token_ids(tokenizer, [[{"role": "user", "content": q}] for q in PROMPTS])

    failed = False
    try:
        for backend in backends:
            reason = skip_reason(backend, cuda_gpus if device == "cuda" else 0, args.engines)
            if reason is not None:
                result["backends"][backend] = {"skipped": reason, "error": None}
                print(f"[gpu_weight_transfer] {backend}: skipped ({reason})", flush=True)
                continue
            print(f"[gpu_weight_transfer] {backend}: {args.engines} engines, {args.repeats} timed sends", flush=True)
            try:
                result["backends"][backend] = run_backend(backend, args, model_dir, device, cuda_gpus, prompt_ids)
            except Exception:  # recorded; the next backend still runs
                failed = True
                result["backends"][backend] = {"skipped": None, "error": traceback.format_exc()[-4000:]}
                print(f"[gpu_weight_transfer] {backend} FAILED:\n{traceback.format_exc()}", file=sys.stderr,
                      flush=True)
    finally:
        if tmp_dir is not None:
            tmp_dir.cleanup()
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        table = summary_table(result)
        out.with_suffix(".txt").write_text(table + "\n")
        print(table, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
