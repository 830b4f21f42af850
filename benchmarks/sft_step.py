#!/usr/bin/env python
"""Cost of one SFT training step: plain SFT vs this project's EKSFT vs the authors' (naive) EKSFT.

One run, one model, one batch; each variant is a full training step
(forward(s) + loss + backward + grad clip + AdamW step):

* ``sft``   - policy forward with grad, plain CE through the ``sft`` objective.
* ``eksft`` - this project: policy forward with grad + ONE no-grad forward of a frozen reference
  copy + the ``eksft`` objective (entropy / KL / log p(label) chunked, taken detached from the same
  policy forward for the selection, with gradient for the regularisers).
* ``eksft-padded`` / ``eksft-packed`` - ``eksft`` through the trainer's own forward
  (`eksft.sft.forward.causal_lm_logits`, the LM head from the first labelled position on) on the padded batch vs
  on one packed row without padding (``packed``; `rl.common.packing`): what packing saves on
  variable-length rows (``--min-length`` sets how variable). The check asserts that the two losses are equal.
* ``naive`` - BASELINE, the authors' formulation, implemented in this file only (`naive_loss`): an
  EXTRA no-grad policy forward just for the statistics, a no-grad reference forward, full-vocabulary
  float32 [B, T, V] softmax / log-softmax tensors, torch.topk over the flattened valid tokens, then
  CE over the kept tokens and the entropy bonus / KL term recomputed with grad over full [B, T, V]
  float32 tensors. (The true KL is used, not the authors' mixed-up one, so that both compute the
  same loss: only the cost differs.)

Before timing, a check asserts that ``eksft`` and ``naive`` give the same loss on the same weights
and batch (both with ``EKSFTSettings(scope="batch", aggregation="token-mean")``), so the
comparison is apples to apples. The reference is the policy plus small seeded noise
(``--ref-noise``), as after some training: with policy == reference every KL is exactly 0 and the
KL selection would be decided by tie-breaking (stable sort here, unspecified in torch.topk).

Each variant and the check run in their own subprocess (a fresh process: clean peak-memory
accounting and no allocator state carried over). Time: the median (and min) of `--steps` timed
steps after `--warmup`. On CPU (``--timing auto``) the reported times come from one more subprocess
that runs the variants round-robin, step by step, so that background load on a shared machine hits
all variants alike; each variant's own-process times are kept as ``step_times_isolated``. On a
shared 2-core machine ``--threads 1`` is far less sensitive to other processes than 2 threads.
Memory:
* CUDA: ``torch.cuda.max_memory_allocated`` over warm-up + timed steps; ``peak_mem_mb`` is that
  absolute peak (weights, reference, optimizer state included), ``peak_mem_delta_mb`` the peak
  minus the memory allocated right before the first step, ``peak_mem_fwd_bwd_mb`` the peak up to
  the end of backward (optimizer step excluded).
* CPU: ``ru_maxrss`` of the child minus its RSS right before the first step (``peak_mem_mb`` and
  ``peak_mem_delta_mb`` are then the same number); ``peak_mem_abs_mb`` is ``ru_maxrss`` itself.
In both cases the AdamW state is allocated before "right before the first step", so the delta is
what the step itself needs (activations, gradients, logits and loss temporaries).

Precision (``--bf16 auto|true|false``, default auto: bf16 where the device computes it natively, as the
trainers decide in ``rl.common.precision``; the JSON and its table record the capability and the decision). bf16 on
CPU is ``torch.autocast("cpu", dtype=torch.bfloat16)`` around forwards + loss, weights and AdamW in float32.
On CUDA the model is loaded in bfloat16 directly (weights, gradients and AdamW state bf16, no autocast);
``--bf16-mode autocast`` selects fp32 weights + autocast instead. Every variant runs at the same precision.

Examples (the default output name carries the machine's capability tag, e.g. ``cpu-avx512-bf16``, ``cpu-avx2``):
  python benchmarks/sft_step.py --model embedded:smollm2-135m-instruct --batch 8 --seq 160 --steps 4 --warmup 1
  python benchmarks/sft_step.py --model random-qwen2-0.5b --device cuda --batch 1 --seq 4096 \
      --steps 10 --warmup 3 --out benchmarks/results/sft_step_gpu_qwen2-0.5b.json

Imports only torch, transformers, pydantic (through eksft.objectives) and the standard library:
no datasets / vLLM / Ray, so it runs on a bare GPU image.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
try:  # run from a plain checkout (e.g. the GPU machine, where the project is not installed)
    import eksft  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(REPO_ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_precision.py, also when loaded as a file

import _precision  # noqa: E402
import _results  # noqa: E402
from eksft.objectives import IGNORE_INDEX, EKSFTSettings, SFTSettings, get_objective, select_eksft_tokens  # noqa: E402
from rl.common.precision import detect_hardware, resolve_bf16  # noqa: E402
from eksft.objectives import tokens_to_select  # noqa: E402

VARIANTS = ("sft", "eksft", "naive", "eksft-padded", "eksft-packed")

# Random-initialised models of real shapes (no weights needed).
RANDOM_MODELS: dict[str, dict[str, Any]] = {
    "random-qwen2-0.5b": dict(  # Qwen2(.5)-0.5B
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}

LOSS_RTOL = 1e-4
LOSS_ATOL = 1e-5


# --------------------------------------------------------------------------------------------
# Setup: model, reference, optimizer, batch
# --------------------------------------------------------------------------------------------


@dataclass
class Setup:
    policy: torch.nn.Module
    ref: torch.nn.Module | None
    optimizer: torch.optim.Optimizer | None
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T-1], aligned with logits[:, :-1]
    objective: EKSFTSettings
    device: torch.device
    autocast: bool

    def amp(self):
        """Autocast context of the forwards + loss (bf16 autocast mode), else a no-op."""
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def precision(args: argparse.Namespace, device: torch.device) -> tuple[torch.dtype, bool, str]:
    """(weights dtype, autocast?, description), with ``--bf16 auto`` resolved as the trainers resolve it."""
    choice = resolve_bf16(args.bf16, device.type)
    setting = getattr(args, "bf16_setting", choice.setting)  # "auto" when the parent resolved it
    if not choice.bf16:
        return torch.float32, False, f"float32 ({setting})"
    mode = args.bf16_mode
    if mode == "auto":
        mode = "weights" if device.type == "cuda" else "autocast"
    if mode == "weights":
        return torch.bfloat16, False, f"bf16 weights (model loaded in bfloat16, no autocast; {setting})"
    return torch.float32, True, f"bf16 autocast ({device.type}), float32 weights and AdamW ({setting})"


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if args.model in RANDOM_MODELS:
        from transformers import Qwen2Config

        shape = dict(RANDOM_MODELS[args.model])
        if args.num_layers:  # smoke tests of the path on small machines
            shape["num_hidden_layers"] = args.num_layers
        config = Qwen2Config(**shape, use_cache=False)
        torch.manual_seed(args.seed)
        try:  # initialise directly on the device (fast for 0.5B on a GPU)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except Exception:  # noqa: BLE001 - fall back to CPU init + copy
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    else:
        from eksft.models import resolve_model_dir

        model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(args.model), dtype=dtype).to(device)
    model.config.use_cache = False
    return model


def make_reference(policy: torch.nn.Module, noise: float, seed: int) -> torch.nn.Module:
    """A frozen copy of the policy plus seeded relative noise (std = noise * std of each tensor)."""
    ref = copy.deepcopy(policy)
    ref.requires_grad_(False)
    ref.eval()
    if noise > 0:
        gen = torch.Generator(device=next(ref.parameters()).device).manual_seed(seed + 1)
        with torch.no_grad():
            for p in ref.parameters():
                if p.numel() > 1:
                    scale = noise * p.float().std().item()
                    p.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) * scale)
    return ref


def make_batch(vocab: int, batch: int, seq: int, seed: int, device: torch.device, min_length: float = 0.75):
    """Random token ids with a realistic label mask.

    Sequence b has length L_b ~ U[min_length T, T] (the first one is T), then right padding; its prompt
    is the first P_b ~ U[0.1, 0.4] * L_b tokens. Labels are the response tokens; prompt and padding
    are IGNORE_INDEX. Returns input_ids [B, T], attention_mask [B, T] and labels [B, T-1] aligned
    with logits[:, :-1].
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    lengths = torch.randint(max(2, int(min_length * seq)), seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    prompt = (lengths * (0.1 + 0.3 * torch.rand(batch, generator=gen))).long().clamp(min=1)
    pos = torch.arange(seq)[None, :]
    attention = pos < lengths[:, None]
    ids = torch.where(attention, ids, 0)
    labels_full = torch.where(attention & (pos >= prompt[:, None]), ids, IGNORE_INDEX)
    return ids.to(device), attention.long().to(device), labels_full[:, 1:].contiguous().to(device)


def build_setup(args: argparse.Namespace, need_ref: bool, need_optimizer: bool = True) -> Setup:
    device = resolve_device(args.device)
    dtype, use_autocast, _ = precision(args, device)
    policy = build_model(args, device, dtype)
    policy.train()
    ref = make_reference(policy, args.ref_noise, args.seed) if need_ref else None
    optimizer = None
    if need_optimizer:
        # The authors' settings: lr 1e-5, betas (0.9, 0.95), weight decay 0.1 (grad clip 1.0 in train_step).
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    vocab = policy.get_output_embeddings().weight.shape[0]
    input_ids, attention_mask, labels = make_batch(vocab, args.batch, args.seq, args.seed, device, args.min_length)
    objective = objective_config(args)
    return Setup(policy, ref, optimizer, input_ids, attention_mask, labels, objective, device, use_autocast)


def objective_config(args: argparse.Namespace) -> EKSFTSettings:
    """The one config of the comparison: batch scope, token-mean aggregation (eksft and naive alike)."""
    return EKSFTSettings(scope="batch", aggregation="token-mean", ratio=args.ratio)


# --------------------------------------------------------------------------------------------
# Losses of the three variants
# --------------------------------------------------------------------------------------------


def _logits(model: torch.nn.Module, s: Setup) -> torch.Tensor:
    """[B, T-1, V] logits, aligned with `s.labels`."""
    out = model(input_ids=s.input_ids, attention_mask=s.attention_mask, use_cache=False)
    return out.logits[:, :-1]


def sft_loss(s: Setup) -> torch.Tensor:
    """`sft`: policy forward with grad + the `sft` objective (plain CE)."""
    with s.amp():
        logits = _logits(s.policy, s)
        plain = SFTSettings(aggregation=s.objective.aggregation)
        return get_objective("sft").parts(logits, s.labels, None, plain).reduce()


def eksft_loss(s: Setup) -> torch.Tensor:
    """`eksft` (this project): one no-grad reference forward + policy forward with grad + `eksft`."""
    with torch.no_grad(), s.amp():
        ref_logits = _logits(s.ref, s)
    with s.amp():
        logits = _logits(s.policy, s)
        return get_objective("eksft").parts(logits, s.labels, ref_logits, s.objective).reduce()


def naive_loss(s: Setup, details: bool = False):
    """BASELINE - the authors' formulation of EKSFT (for cost comparison only).

    Differences from `eksft_loss`, all of them costs: an extra no-grad policy forward only to get
    the statistics, full-vocabulary float32 [B, T, V] probability tensors (for all positions,
    prompt and padding included), and the entropy / KL recomputed with grad over full [B, T, V]
    float32 tensors. Selection: torch.topk over the flattened valid tokens (scope = batch); the
    loss is token-mean over each set, as `EKSFTSettings(scope="batch", aggregation="token-mean")`.
    The KL is the true KL(policy || reference), so the loss equals the `eksft` loss.
    """
    cfg = s.objective
    mask = s.labels != IGNORE_INDEX
    flat_mask = mask.reshape(-1)
    with torch.no_grad():
        with s.amp():
            stat_logits = _logits(s.policy, s)  # the extra policy forward, statistics only
            ref_logits = _logits(s.ref, s)
        probs = torch.softmax(stat_logits.float(), dim=-1)
        logp = torch.log_softmax(stat_logits.float(), dim=-1)
        ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
        entropy = -(probs * logp).sum(-1)
        kl = (probs * (logp - ref_logp)).sum(-1)
        del probs, logp, stat_logits, ref_logits
        valid_idx = flat_mask.nonzero().squeeze(1)
        k = int(tokens_to_select(cfg.ratio, torch.tensor(valid_idx.numel())))
        top_h = valid_idx[torch.topk(entropy.reshape(-1)[valid_idx], k, largest=cfg.largest_entropy).indices]
        top_kl = valid_idx[torch.topk(kl.reshape(-1)[valid_idx], k, largest=cfg.largest_kl).indices]
        s_h = torch.zeros_like(flat_mask)
        s_h[top_h] = True
        s_kl = torch.zeros_like(flat_mask)
        s_kl[top_kl] = True
        removed = s_h | s_kl if cfg.combine == "union" else s_h & s_kl
        kept = flat_mask & ~removed

    with s.amp():
        logits = _logits(s.policy, s)
    vocab = logits.shape[-1]
    logits32 = logits.float()
    ce = F.cross_entropy(logits32.reshape(-1, vocab), s.labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    logp_g = torch.log_softmax(logits32, dim=-1)
    probs_g = torch.softmax(logits32, dim=-1)
    entropy_g = -(probs_g * logp_g).sum(-1).reshape(-1)
    kl_g = (probs_g * (logp_g - ref_logp)).sum(-1).reshape(-1)
    loss = (
        ce[kept].sum() / kept.sum().clamp(min=1)
        - cfg.lambda_entropy * entropy_g[s_h].sum() / s_h.sum().clamp(min=1) / math.log(vocab)
        + cfg.lambda_kl * kl_g[s_kl].sum() / s_kl.sum().clamp(min=1)
    )
    if details:
        shape = mask.shape
        return loss, {"s_entropy": s_h.reshape(shape), "s_kl": s_kl.reshape(shape), "entropy": entropy, "kl": kl}
    return loss


def trainer_eksft_loss(s: Setup, packed: bool) -> torch.Tensor:
    """`eksft` with the cold start's forward (`eksft.sft.forward.causal_lm_logits`): logits from the first labelled
    position on, on the padded batch or on one packed row (``packed``)."""
    from eksft.sft.forward import causal_lm_logits

    valid = s.labels != IGNORE_INDEX
    first = int(valid.any(0).nonzero()[0])  # logits[:, j] predict labels[:, j]
    with torch.no_grad(), s.amp():
        ref_logits = causal_lm_logits(s.ref, s.input_ids, s.attention_mask, first, packed=packed)[:, :-1]
    with s.amp():
        logits = causal_lm_logits(s.policy, s.input_ids, s.attention_mask, first, packed=packed)[:, :-1]
        return get_objective("eksft").parts(logits, s.labels[:, first:], ref_logits, s.objective).reduce()


LOSSES: dict[str, Callable[[Setup], torch.Tensor]] = {
    "sft": sft_loss, "eksft": eksft_loss, "naive": naive_loss,
    "eksft-padded": lambda s: trainer_eksft_loss(s, packed=False),
    "eksft-packed": lambda s: trainer_eksft_loss(s, packed=True),
}


def train_step(s: Setup, variant: str, after_backward: Callable[[], None] | None = None) -> float:
    """forward(s) + loss + backward + grad clip 1.0 + AdamW step; returns the loss."""
    loss = LOSSES[variant](s)
    loss.backward()
    if after_backward is not None:
        after_backward()
    torch.nn.utils.clip_grad_norm_(s.policy.parameters(), 1.0)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Allocate AdamW's state up front (a step with zero gradients at lr 0 changes no weight)."""
    lrs = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------
# Equivalence check and one variant's measurement
# --------------------------------------------------------------------------------------------


def compare_losses(s: Setup) -> dict[str, Any]:
    """eksft vs naive loss (and selections) on the same weights and batch, no backward."""
    mask = s.labels != IGNORE_INDEX
    with torch.no_grad():
        eksft_value = float(eksft_loss(s))
        naive_value, det = naive_loss(s, details=True)
        naive_value = float(naive_value)
        # The selection this project makes, for a diagnostic of where a mismatch would come from.
        with s.amp():
            logits = _logits(s.policy, s)
            ref_logits = _logits(s.ref, s)
        chosen = select_eksft_tokens(logits, s.labels, ref_logits, s.objective)
        stats, s_h, s_kl = chosen.stats, chosen.s_entropy, chosen.s_kl
        padded_value = float(trainer_eksft_loss(s, packed=False))
        packed_value = float(trainer_eksft_loss(s, packed=True))
    diff = abs(eksft_value - naive_value)
    ok = math.isclose(eksft_value, naive_value, rel_tol=LOSS_RTOL, abs_tol=LOSS_ATOL)
    ok = ok and all(math.isclose(v, eksft_value, rel_tol=LOSS_RTOL, abs_tol=LOSS_ATOL) for v in (padded_value, packed_value))
    return {
        "status": "ok" if ok else "mismatch",
        "eksft_loss": eksft_value,
        "naive_loss": naive_value,
        "trainer_padded_loss": padded_value,
        "trainer_packed_loss": packed_value,
        "abs_diff": diff,
        "rtol": LOSS_RTOL,
        "atol": LOSS_ATOL,
        "entropy_selection_mismatches": int((s_h != det["s_entropy"]).sum()),
        "kl_selection_mismatches": int((s_kl != det["s_kl"]).sum()),
        "valid_tokens": int(mask.sum()),
        "selected_per_set": int(s_h.sum()),
        "max_abs_entropy_diff": float((stats.entropy - det["entropy"]).abs().masked_fill(~mask, 0).max()),
        "kl_mean": float(stats.kl[mask].mean()),
    }


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if oom_type and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(exc, MemoryError)
    )


def _rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # pragma: no cover
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MB = 1024 * 1024


class MemoryMeter:
    """Peak memory over a window that starts right before the first step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.peak = 0
        self.fwd_bwd_peak = 0

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _rss_bytes()

    def step_begin(self) -> None:
        """CUDA: fold the previous step's peak in and reset, so `after_backward` sees this step only."""
        if self.cuda:
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def after_backward(self) -> None:
        if self.cuda:
            self.fwd_bwd_peak = max(self.fwd_bwd_peak, torch.cuda.max_memory_allocated(self.device))

    def read(self) -> dict[str, Any]:
        if self.cuda:
            peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
            return {
                "peak_mem_mb": peak / MB,
                "peak_mem_delta_mb": (peak - self.base) / MB,
                "base_mem_mb": self.base / MB,
                "peak_mem_abs_mb": peak / MB,
                "peak_mem_fwd_bwd_mb": self.fwd_bwd_peak / MB,
                "mem_method": "cuda max_memory_allocated over warm-up + timed steps; peak_mem_mb = absolute peak, "
                "peak_mem_delta_mb = peak - allocated before the first step, peak_mem_fwd_bwd_mb = peak up to the "
                "end of backward (the optimizer step excluded)",
            }
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {
            "peak_mem_mb": (peak - self.base) / MB,
            "peak_mem_delta_mb": (peak - self.base) / MB,
            "base_mem_mb": self.base / MB,
            "peak_mem_abs_mb": peak / MB,
            "mem_method": "cpu: ru_maxrss of a fresh subprocess per variant minus its RSS right before the "
            "first step (weights, reference, AdamW state already allocated); warm-up steps included",
        }


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """Build a fresh setup, warm up, time `args.steps` steps; OOM is recorded, not raised."""
    row: dict[str, Any] = {"variant": variant}
    s = build_setup(args, need_ref=variant != "sft")
    init_optimizer_state(s.optimizer)
    meter = MemoryMeter(s.device)
    meter.start()
    times: list[float] = []
    losses: list[float] = []
    step = -1
    try:
        for step in range(args.warmup + args.steps):
            meter.step_begin()
            _sync(s.device)
            t0 = time.perf_counter()
            losses.append(train_step(s, variant, meter.after_backward))
            _sync(s.device)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        row.update(status="ok")
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON
        if not _is_oom(exc):
            raise
        row.update(status="oom", error=f"{type(exc).__name__}: {str(exc)[:400]}", failed_at_step=step)
        s.optimizer.zero_grad(set_to_none=True)
    row.update(
        step_time_s_median=statistics.median(times) if times else None,
        step_time_s_min=min(times) if times else None,
        step_times=times,
        losses=losses,
    )
    row.update(meter.read())
    if getattr(args, "in_process", False) and s.device.type == "cpu":
        row["mem_method"] += " [IN-PROCESS run: ru_maxrss is cumulative over the process, not comparable]"
    return row


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["total_memory_mb"] = torch.cuda.get_device_properties(device).total_memory / MB
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def run_interleaved(args: argparse.Namespace, variants: list[str]) -> dict[str, Any]:
    """Time all variants in ONE process, round-robin step by step (the order rotates each round).

    On a shared, noisy CPU a burst of background load then hits every variant alike, so the ratios
    stay meaningful; peak memory still comes from the per-variant subprocesses.
    """
    s = build_setup(args, need_ref=True)
    init_optimizer_state(s.optimizer)
    out: dict[str, Any] = {v: {"step_times": [], "losses": [], "status": "ok"} for v in variants}
    active = list(variants)
    for rnd in range(args.warmup + args.steps):
        order = active[rnd % len(active):] + active[: rnd % len(active)] if active else []
        for v in order:
            try:
                _sync(s.device)
                t0 = time.perf_counter()
                loss = train_step(s, v)
                _sync(s.device)
            except Exception as exc:  # noqa: BLE001
                if not _is_oom(exc):
                    raise
                s.optimizer.zero_grad(set_to_none=True)
                out[v].update(status="oom", error=f"{type(exc).__name__}: {str(exc)[:400]}")
                active.remove(v)
                gc.collect()
                continue
            out[v]["losses"].append(loss)
            if rnd >= args.warmup:
                out[v]["step_times"].append(time.perf_counter() - t0)
    return {"variant": "interleaved", "status": "ok", "timings": out}


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """The equivalence check plus model / batch facts."""
    s = build_setup(args, need_ref=True, need_optimizer=False)
    cfg = s.policy.config
    facts = {
        "model": {
            "name": args.model,
            "architecture": cfg.architectures[0] if getattr(cfg, "architectures", None) else type(s.policy).__name__,
            "params_m": sum(p.numel() for p in s.policy.parameters()) / 1e6,
            "vocab": s.policy.get_output_embeddings().weight.shape[0],
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "dtype": str(next(s.policy.parameters()).dtype),
        },
        "batch": {
            "shape": list(s.input_ids.shape),
            "tokens": int(s.attention_mask.sum()),
            "response_tokens": int((s.labels != IGNORE_INDEX).sum()),
        },
        "device": _device_info(s.device),
    }
    try:
        facts["check"] = compare_losses(s)
    except Exception as exc:  # noqa: BLE001
        if not _is_oom(exc):
            raise
        facts["check"] = {"status": "oom", "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    return facts


# --------------------------------------------------------------------------------------------
# Orchestration (one subprocess per variant), results
# --------------------------------------------------------------------------------------------


def _run_child(args: argparse.Namespace, task: str, timeout: float | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sft_step_") as tmp:
        cfg_path, out_path = Path(tmp) / "args.json", Path(tmp) / "out.json"
        cfg_path.write_text(json.dumps(vars(args)))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", task, "--child-args", str(cfg_path),
               "--json-out", str(out_path)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"variant": task, "status": "timeout", "error": f"child exceeded {timeout} s"}
        if proc.returncode == 0 and out_path.is_file():
            return json.loads(out_path.read_text())
        status = "oom" if proc.returncode in (-9, 137) else "failed"  # the kernel's OOM killer sends SIGKILL
        return {"variant": task, "status": status, "returncode": proc.returncode, "error": proc.stderr[-2000:]}


def _ratio(rows: dict[str, dict], num: str, den: str, key: str) -> float | None:
    a, b = rows.get(num), rows.get(den)
    if not a or not b or a.get("status") != "ok" or b.get("status") != "ok":
        return None
    if not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def compute_ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    by = {r["variant"]: r for r in rows}
    return {
        "eksft_over_sft_time": _ratio(by, "eksft", "sft", "step_time_s_median"),
        "naive_over_eksft_time": _ratio(by, "naive", "eksft", "step_time_s_median"),
        "eksft_packed_over_padded_time": _ratio(by, "eksft-packed", "eksft-padded", "step_time_s_median"),
        "eksft_packed_over_padded_mem": _ratio(by, "eksft-packed", "eksft-padded", "peak_mem_mb"),
        # min step times: background load only ever adds time, so on a shared CPU these are the robust ones
        "eksft_over_sft_time_min": _ratio(by, "eksft", "sft", "step_time_s_min"),
        "naive_over_eksft_time_min": _ratio(by, "naive", "eksft", "step_time_s_min"),
        "naive_over_eksft_mem": _ratio(by, "naive", "eksft", "peak_mem_mb"),
        "eksft_over_sft_mem": _ratio(by, "eksft", "sft", "peak_mem_mb"),
        "naive_over_eksft_mem_delta": _ratio(by, "naive", "eksft", "peak_mem_delta_mb"),
        "eksft_over_sft_mem_delta": _ratio(by, "eksft", "sft", "peak_mem_delta_mb"),
        "naive_over_eksft_mem_fwd_bwd": _ratio(by, "naive", "eksft", "peak_mem_fwd_bwd_mb"),
        "eksft_over_sft_mem_fwd_bwd": _ratio(by, "eksft", "sft", "peak_mem_fwd_bwd_mb"),
    }


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(result: dict[str, Any]) -> str:
    c = result["config"]
    model = result.get("model") or {}
    dev = result.get("device") or {}
    lines = [
        f"### sft_step: {c['model']} ({_fmt(model.get('params_m'), 1)}M params, V={model.get('vocab')}), "
        f"batch {c['batch']} x seq {c['seq']}, {dev.get('type')} ({dev.get('name')}), {c['precision']}",
        "",
        _precision.header(result["precision_record"]),
        "",
        f"{c['steps']} timed steps after {c['warmup']} warm-up; torch {result['torch_version']}, "
        f"transformers {result.get('transformers_version')}; objective: scope=batch, aggregation=token-mean, "
        f"ratio {c['ratio']}; {(result.get('batch') or {}).get('response_tokens')} response tokens.",
        "",
    ]
    fwd_bwd = any(r.get("peak_mem_fwd_bwd_mb") is not None for r in result["rows"])
    lines += [
        "| variant | status | step time median (s) | min (s) | median in own process (s) | peak mem (MB) "
        "| peak - pre-step (MB) |" + (" peak to end of backward (MB) |" if fwd_bwd else ""),
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if fwd_bwd else ""),
    ]
    for r in result["rows"]:
        isolated = r.get("step_time_s_median_isolated", r.get("step_time_s_median"))
        lines.append(
            f"| {r['variant']} | {r.get('status')} | {_fmt(r.get('step_time_s_median'))} | "
            f"{_fmt(r.get('step_time_s_min'))} | {_fmt(isolated)} | {_fmt(r.get('peak_mem_mb'), 0)} | "
            f"{_fmt(r.get('peak_mem_delta_mb'), 0)} |" + (f" {_fmt(r.get('peak_mem_fwd_bwd_mb'), 0)} |" if fwd_bwd else "")
        )
    ratios = result["ratios"]
    lines += [
        "",
        "| ratio | value |",
        "|---|---:|",
        *(f"| {k} | {_fmt(v, 2)} |" for k, v in ratios.items() if v is not None),
        "",
    ]
    check = result.get("check") or {}
    if check:
        diff = check.get("abs_diff")
        lines.append(
            f"Equivalence check ({check.get('status')}): eksft loss {_fmt(check.get('eksft_loss'), 6)}, "
            f"naive loss {_fmt(check.get('naive_loss'), 6)}, |diff| {'-' if diff is None else f'{diff:.2e}'}."
        )
    if dev.get("type") == "cpu":
        lines.append(
            f"CPU: {dev.get('cpu_count')} cores, {dev.get('torch_threads')} torch threads; load average (1/5/15 min) "
            f"at start {dev.get('loadavg_1_5_15_at_start')}, at end {dev.get('loadavg_1_5_15_at_end')}."
        )
    for m in {r.get("timing_method") for r in result["rows"] if r.get("timing_method")}:
        lines.append(f"Time: {m}.")
    methods = {r.get("mem_method") for r in result["rows"] if r.get("mem_method")}
    for m in methods:
        lines.append(f"Memory: {m}.")
    return "\n".join(lines) + "\n"


def write_results(path: str | Path, result: dict[str, Any]) -> tuple[Path, Path]:
    """Write `path` (JSON) and the markdown table next to it (`.md`); returns both paths."""
    return _results.write_results(path, result, markdown_table(result))


def assemble(args: argparse.Namespace, facts: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    import transformers

    device = resolve_device(args.device)
    config = {k: v for k, v in vars(args).items() if k not in ("child", "child_args", "json_out")}
    config["precision"] = precision(args, device)[2]
    precision_record = _precision.record(args, device.type)
    config["objective"] = objective_config(args).model_dump()
    device_info = dict(facts.get("device") or _device_info(device))
    if hasattr(os, "getloadavg"):  # background load explains noisy CPU timings
        device_info["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
        if facts.get("loadavg_at_start"):
            device_info["loadavg_1_5_15_at_start"] = facts["loadavg_at_start"]
    return {
        "benchmark": "sft_step",
        "config": config,
        "precision_record": precision_record,
        "device": device_info,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "model": facts.get("model"),
        "batch": facts.get("batch"),
        "check": facts.get("check"),
        "rows": rows,
        "ratios": compute_ratios(rows),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    timeout = args.child_timeout or None
    load_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    if args.in_process:
        facts = run_check(args)
    else:
        facts = _run_child(args, "check", timeout)
    check = facts.get("check") or {}
    print(f"[sft_step] check: {json.dumps(check)}", flush=True)
    facts["loadavg_at_start"] = load_start
    if "model" not in facts:  # the check child itself failed
        if args.on_mismatch == "fail":
            raise SystemExit(f"check child failed: {facts.get('error', '')[-2000:]}")
        facts = {"check": {"status": facts.get("status", "failed"), "error": facts.get("error", "")[-2000:]},
                 "loadavg_at_start": load_start}
        check = facts["check"]
    if check.get("status") == "mismatch" and args.on_mismatch == "fail":
        raise SystemExit("eksft and naive losses differ; not timing an unequal comparison (see check above)")
    rows = []
    for variant in variants:
        row = run_variant(args, variant) if args.in_process else _run_child(args, variant, timeout)
        row["timing_method"] = "subprocess: this variant's own process, consecutive steps"
        print(f"[sft_step] {variant}: {row.get('status')} median {_fmt(row.get('step_time_s_median'))} s, "
              f"peak {_fmt(row.get('peak_mem_mb'), 0)} MB", flush=True)
        rows.append(row)
        if args.out:  # partial results survive an outer timeout
            write_results(args.out, assemble(args, facts, rows))
    if timing_mode(args) == "interleaved":
        inter = run_interleaved(args, variants) if args.in_process else _run_child(args, "interleaved", timeout)
        timings = inter.get("timings")
        if not timings:
            print(f"[sft_step] interleaved timing failed; keeping per-subprocess times: {inter.get('error', '')[-1500:]}")
        for row in rows if timings else []:
            t = timings[row["variant"]]
            row["step_times_isolated"] = row.get("step_times")
            row["step_time_s_median_isolated"] = row.get("step_time_s_median")
            row["step_times"] = t["step_times"]
            row["step_time_s_median"] = statistics.median(t["step_times"]) if t["step_times"] else None
            row["step_time_s_min"] = min(t["step_times"]) if t["step_times"] else None
            row["timing_method"] = "interleaved: all variants in one process, round-robin per step"
            if row.get("status") == "ok" and t["status"] != "ok":
                row["status"] = t["status"]
                row["error"] = t.get("error")
            print(f"[sft_step] {row['variant']} (interleaved): median {_fmt(row['step_time_s_median'])} s", flush=True)
    return assemble(args, facts, rows)


def timing_mode(args: argparse.Namespace) -> str:
    if args.timing != "auto":
        return args.timing
    return "interleaved" if resolve_device(args.device).type == "cpu" else "subprocess"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct",
                   help=f"eksft model name (embedded:..., tiny:..., a directory) or one of {', '.join(RANDOM_MODELS)}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=160, help="tokens per sequence (the longest; others --min-length-100%%)")
    p.add_argument("--min-length", type=float, default=0.75,
                   help="the shortest sequence as a fraction of --seq (lengths uniform in between)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    _precision.add_precision_args(p, rollout=False)  # --bf16 / --no-bf16 (CPU: autocast; CUDA: bf16 weights); auto
    p.add_argument("--bf16-mode", choices=["auto", "weights", "autocast"], default="auto")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--ref-noise", type=float, default=0.01,
                   help="reference = policy + N(0, (noise * std)^2) per tensor, so that KL is not all zero")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-layers", type=int, default=0, help="override the layer count of a random-* model (smoke tests)")
    p.add_argument("--on-mismatch", choices=["fail", "record"], default="fail",
                   help="what to do when eksft and naive losses differ or the check fails (record: write it in the JSON and go on)")
    p.add_argument("--timing", choices=["auto", "subprocess", "interleaved"], default="auto",
                   help="where step times come from: each variant's own subprocess, or one extra subprocess that "
                   "runs the variants round-robin step by step (robust to background load); auto: interleaved on CPU")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--in-process", action="store_true",
                   help="no subprocesses (debugging); CPU peak memory is then cumulative and not comparable")
    p.add_argument("--child-timeout", type=float, default=0, help="seconds per subprocess (0: none)")
    p.add_argument("--loops", action="store_true",
                   help="whole optimizer steps of the cold start's trainer loop (sft.workers: 1) against the HF Trainer "
                   "it replaced (benchmarks/hf_trainer_baseline.py), sft and eksft, on the embedded arithmetic data "
                   "(benchmarks/_sft_loops.py); writes sft_step_loops_<model>_<capability>.json")
    p.add_argument("--rounds", type=int, default=2, help="--loops: round-robin rounds over the 4 runs")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sft_step_<model>_<capability tag>.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-args", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_main(args: argparse.Namespace) -> None:
    saved = json.loads(Path(args.child_args).read_text())
    task, out = args.child, args.json_out
    args = argparse.Namespace(**saved)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if task == "check":
            result = run_check(args)
        elif task == "interleaved":
            result = run_interleaved(args, [v.strip() for v in args.variants.split(",") if v.strip()])
        else:
            result = run_variant(args, task)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        result = {"variant": task, "status": "oom" if _is_oom(exc) else "failed",
                  "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"}
    _results.write_json(out, result)


def run_loops_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """``--loops``: the trainer loop against the HF Trainer (benchmarks/_sft_loops.py)."""
    import _sft_loops

    device = resolve_device(args.device)
    load_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    result = _sft_loops.run_loops(args)
    config = {k: v for k, v in vars(args).items() if k not in ("child", "child_args", "json_out")}
    config["precision"] = ("bf16 compute on float32 weights and AdamW (loop: FSDP2 mixed precision; hf: autocast)"
                           if args.bf16 else "float32")
    info = _device_info(device)
    if load_start:
        info["loadavg_1_5_15_at_start"] = load_start
        info["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {"benchmark": "sft_step --loops", "config": config, "precision_record": _precision.record(args, device.type),
              "device": info, "torch_version": torch.__version__, **result,
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    json_path, md_path = _results.write_results(args.out, result, _sft_loops.markdown_table(result))
    print(_sft_loops.markdown_table(result))
    print(f"[sft_step] wrote {json_path} and {md_path}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return None
    if args.out is None:
        tag = args.model.replace(":", "-").replace("/", "_")
        machine = detect_hardware(resolve_device(args.device).type).tag
        args.out = _results.default_path("sft_step_loops" if args.loops else "sft_step", tag, machine)
    if args.threads:
        torch.set_num_threads(args.threads)
    _precision.resolve(args, resolve_device(args.device).type)  # the children get the resolved value
    if args.loops:
        return run_loops_benchmark(args)
    result = run_benchmark(args)
    json_path, md_path = write_results(args.out, result)
    print(markdown_table(result))
    print(f"[sft_step] wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()
