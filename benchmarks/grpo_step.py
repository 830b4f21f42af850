#!/usr/bin/env python
"""Cost of one GRPO step: this project's GRPOTrainer (vLLM rollouts) vs TRL's GRPOTrainer (transformers generate).

One run, one model, the same prompts x group size x max new tokens x steps for every system:

* ``ours``   - `rl.grpo.trainer.GRPOTrainer` with the in-process vLLM engine, ``beta_kl=0``,
  ``kl_metric=False`` (no reference model), the trainer's precision from ``--bf16`` / ``--no-bf16``
  (default auto: bf16 compute where the CPU computes bf16 natively, float32 elsewhere; TRL runs at
  the same one); the engine's dtype is ``--rollout-dtype`` (default auto, same rule). The results
  record the CPU capability and the precisions. Step time = wall time of
  ``train_step()``; the split comes from its own metrics (``time/generate``, ``time/reward``,
  ``time/train``, ``time/sync``; ``other`` = wall - their sum: rollout files, metrics).
* ``trl``    - ``trl.GRPOTrainer`` with its default transformers ``generate`` (``use_vllm=False``),
  ``beta=0``, ``loss_type="dapo"`` (= our token-mean), ``scale_rewards="group"`` (= our
  std-normalised advantages), no gradient checkpointing (TRL turns it on by default; our trainer
  has none), one optimizer step = ``per_device_train_batch_size * gradient_accumulation_steps`` =
  prompts x group size sequences, generated in ONE generation batch of the same size. The reward
  function calls this project's `rl.reward.math_reward`, so rewards cost the same. Step time =
  ``on_step_begin`` -> ``on_step_end`` of a TrainerCallback; the split comes from timing wrappers
  around ``_generate_single_turn`` (generation) and ``_calculate_rewards`` (reward).
* ``trl-vllm`` - ``trl`` in TRL's fastest configuration: ``use_vllm=True``, ``vllm_mode="colocate"`` (vLLM in the
  trainer's process; ``--trl-vllm-memory`` is its ``vllm_gpu_memory_utilization``, on a CPU the share of RAM for
  the KV cache). Where it fails on the machine, its row records the error.
* ``engine`` - rollout throughput in one process, after warm-up: this project's
  `rl.rollout.vllm_engine.VLLMEngine.generate` vs plain ``vllm.LLM.generate`` on the SAME ``LLM``
  object (same prompts as token ids, same ``SamplingParams`` n / temperature / max_tokens /
  per-request seed / ``logprobs=0``): the arms produce identical tokens, so tokens/s compares the
  wrapper's overhead alone. A third arm drops the per-request seeds (what they cost), and
  ``--plain-default`` adds a child with a fresh ``vllm.LLM`` built with vLLM's own defaults
  (engine core in its own process, no ``enforce_eager``) to show what `rl.rollout.make_llm`'s
  settings cost.

The prompt set is ``--prompts`` generated one-digit arithmetic problems (``generate("arithmetic",
n, seed)``), so every step of every system samples the same prompts (in its own order). The
learning rate is small (1e-6) so that response lengths stay close to the base model's: the
cost of a step depends on them, so each row also reports completion tokens per step and seconds
per 1k completion tokens.

Each system runs in its own subprocess of this script (``--child SYSTEM``; vLLM and TRL in one
process would compete for RAM and threads), sequentially, and the parent merges the results
into ``--out`` (JSON) and a Markdown table beside it. ``--profile`` (on by default) adds, in the
``ours`` child, a breakdown of the trainer update on the last step's rollouts: the trainer's own
``_update`` (the trainer worker's FSDP2 update: one full-sequence forward per micro-batch, FSDP mixed
precision), then replicas of the update before ``rl.workers`` (each prompt computed once per micro-batch, see
`rl.grpo.logprobs.completion_logprobs`, bf16 by autocast) on the same rank's model and AdamW, with phase
timings (forward: model body vs LM head, token statistics, loss, backward, clip + AdamW) for micro-batches of
whole groups vs in random order, other micro-batch sizes, float32 vs bf16, and flushed denormals; plus the
share of padding and of completion tokens among the computed positions for each micro-batch size.

``ours-padded`` is ``ours`` with ``rl.packing: off`` (every sequence its own left-padded row, the prompt computed
once per completion); ``ours`` runs ``packing: auto``, which `rl.common.packing.PACKING_BY_DEVICE` resolves for the
device. ``--profile`` also times the trainer's own update on the last step's rollouts with packing off and on
(alternating, ``--packing-reps`` each) and counts the positions the forwards compute (``update_by_packing``).

``ours-compiled`` is ``ours`` with ``rollout.enforce_eager: false``: vLLM runs the model through torch.compile
(on a CPU, inductor's C++ kernels; the default there is eager). Its row's ``init_s`` includes the compilation (the
caches of the machine as they are: cold in a fresh environment); the ratios give its generation throughput and its
step rate against TRL's next to those of ``ours``.

``ours-workers2`` is ``ours`` with ``rl.workers: 2`` (two FSDP2 ranks as Ray actors inside the same CPU budget,
one thread each): with ``ours`` it gives the scaling row, step time and per-worker memory: the bytes each rank
holds for parameter shards, gradient shards and AdamW state (`rl.workers.TrainerWorker.local_storage_bytes`),
and each rank's process peak RSS (``VmHWM``; at ``rl.workers: 1`` the rank lives in the controller's process,
so that number includes the in-process vLLM engine).

``ours-engines2`` is ``ours`` with ``rollout.num_engines: 2`` (two vLLM engines as Ray actors sharing each step's
prompts, the weights sent to both through vLLM's weight-transfer API, ``cpu_gloo`` on CPU); ``ours-reload`` is
``ours`` with ``rollout.weight_sync: reload`` (the weights handed to the engine's reload as before the weight-transfer
API): with ``ours`` it gives the sync-time row (``time/sync``, reload vs transfer). ``ours-engines2-reload`` is
``ours-engines2`` with ``rollout.weight_sync: reload``: the gathered weights go through the Ray object store (one
``ray.put`` read by both engine actors), the path before the weight-transfer API; with ``ours-engines2`` it gives the
sync-time row for engines in other processes (object store vs weight transfer).

``--rounds R`` runs the step systems (all but ``engine`` and ``plain-default``) R times, in the given order in
even rounds and reversed in odd ones (``ours, trl, trl, ours, ...``), so that a drift of the machine over the run
(these machines drift by more than the changes measured: the same engine generated the same tokens 40% slower in
one child than in the next) falls on every system alike. A system's row then pools the timed steps of all its
rounds (`merge_rounds`), keeps each round's median (``rounds``) and the first round's profile (later rounds run
without ``--profile``); the ratio to TRL is also given per round (``*_by_round``, round r's ours against round r's
TRL): the spread of the comparison within this run.

Examples:
  python benchmarks/grpo_step.py                                   # 8 prompts x 8 x 128 tokens, 1+2 steps
  python benchmarks/grpo_step.py --systems ours,trl,ours-padded,trl-vllm,engine --rounds 2   # the committed runs
  python benchmarks/grpo_step.py --prompts 4 --group 4 --max-new-tokens 32 --steps 1 --warmup 1 \
      --systems ours,engine --no-profile --out /tmp/grpo_step_smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside it, also when loaded as a module
import _child  # noqa: E402  benchmarks/_child.py: run one phase in a fresh subprocess of this script
import _precision  # noqa: E402  benchmarks/_precision.py: --bf16 / --rollout-dtype resolved as the trainers do
import _results  # noqa: E402  benchmarks/_results.py: the JSON record and its markdown table

SYSTEMS = ("ours", "ours-padded", "trl", "trl-vllm", "engine")  # also: ours-compiled, ours-workers2,
# ours-engines2 (scaling rows), ours-reload, ours-engines2-reload (sync rows), plain-default
ONCE = ("engine", "plain-default")  # rollout-only sections: once, not per --rounds


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def make_rows(n: int, seed: int) -> list[dict]:
    from eksft.data.formats import BOXED_ANSWER_INSTRUCTION, build_prompt
    from eksft.data.generators import generate

    return [{"prompt": build_prompt(r["problem"], instruction=BOXED_ANSWER_INSTRUCTION), "answer": r["answer"],
             "problem": r["problem"]} for r in generate("arithmetic", n, seed)]


def model_dir(args: argparse.Namespace) -> str:
    from eksft.models import resolve_model_dir

    return resolve_model_dir(args.model)


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def load_note() -> dict[str, Any]:
    """The machine's load when a measurement starts/ends (the 2 cores are shared)."""
    one, five, _ = os.getloadavg()
    return {"loadavg_1m": round(one, 2), "loadavg_5m": round(five, 2)}


class CpuMeter:
    """CPU time used by OTHER processes while a measurement runs (the 2 cores are shared).

    ``others_cpu_share`` = (busy CPU time of the whole machine, steal included, minus this process
    tree's CPU time) / (wall time x cores): 0 on a quiet machine; 0.5 means another process kept
    one of the two cores busy. Read from /proc/stat and psutil; None where unavailable.
    """

    def __init__(self):
        self.t = self.busy = self.own = None

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except OSError:
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0.0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float | None:
        try:
            import psutil

            me = psutil.Process()
            total = sum(me.cpu_times()[:2])
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += sum(child.cpu_times()[:2])
            return total
        except Exception:
            return None

    def start(self) -> "CpuMeter":
        self.t, self.busy, self.own = time.perf_counter(), self._busy(), self._own()
        return self

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t
        busy, own = self._busy(), self._own()
        out = load_note()
        if None not in (busy, own, self.busy, self.own) and wall > 0:
            others = max(0.0, (busy - self.busy) - (own - self.own))
            out["others_cpu_share"] = round(others / (wall * (os.cpu_count() or 1)), 3)
            out["own_cpu_cores"] = round((own - self.own) / wall, 2)
        return out


def summarise(system: str, steps: list[dict], warmup: int, extra: dict | None = None) -> dict[str, Any]:
    """Medians over the timed steps (the first ``warmup`` entries are warm-up)."""
    timed = steps[warmup:]
    keys = ("generate", "reward", "train", "sync", "other")
    split = {k: median([s[k] for s in timed if s.get(k) is not None]) for k in keys}
    tokens = median([s["completion_tokens"] for s in timed])
    step = median([s["wall_s"] for s in timed])
    row = {
        "system": system,
        "status": "ok",
        "step_time_s": step,
        "step_time_s_min": min(s["wall_s"] for s in timed),
        "step_time_s_all": [round(s["wall_s"], 3) for s in timed],
        "others_cpu_share_per_step": [s.get("others_cpu_share") for s in timed],
        "steps": len(timed),
        "warmup_steps": warmup,
        "time_split_s": split,
        "completion_tokens_per_step": tokens,
        "s_per_1k_completion_tokens": 1000 * step / tokens if step and tokens else None,
        "generate_tokens_per_s": tokens / split["generate"] if tokens and split["generate"] else None,
        "reward_mean": median([s.get("reward_mean") for s in timed if s.get("reward_mean") is not None]),
        "per_step": steps,
    }
    row.update(extra or {})
    return row


SUMMARY_KEYS = ("system", "status", "step_time_s", "step_time_s_min", "step_time_s_all", "others_cpu_share_per_step",
                "steps", "warmup_steps", "time_split_s", "completion_tokens_per_step", "s_per_1k_completion_tokens",
                "generate_tokens_per_s", "reward_mean", "per_step")


def merge_rounds(system: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a system's rows of several ``--rounds``: `summarise` over the timed steps of every round that ran
    (warm-ups dropped), the first such round's other entries (settings, memory, profile), each round's median step
    in ``rounds`` (None for a round that failed) and the failed rounds' errors in ``round_errors``. One round: its
    row as it is; no round ran: the first failure."""
    ok = [r for r in rounds if r.get("status") == "ok"]
    if len(rounds) == 1 or not ok:
        return rounds[0]
    steps = [s for r in ok for s in r["per_step"] if not s.get("warmup")]
    extra = {k: v for k, v in ok[0].items() if k not in SUMMARY_KEYS}
    row = summarise(system, steps, 0, extra)
    row["warmup_steps"] = ok[0]["warmup_steps"]
    row["rounds"] = [{"step_time_s": r["step_time_s"], "time_split_s": r["time_split_s"]}
                     if r.get("status") == "ok" else None for r in rounds]
    errors = [{"round": i, "status": r.get("status"), "error": r.get("error")}
              for i, r in enumerate(rounds) if r.get("status") != "ok"]
    if errors:
        row["round_errors"] = errors
    return row


# --------------------------------------------------------------------------------------------
# ours: rl.grpo.trainer.GRPOTrainer + in-process vLLM
# --------------------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, workers: int = 1, engines: int = 1, weight_sync: str = "transfer",
             system: str | None = None, packing: str = "auto", enforce_eager: bool | None = None) -> dict[str, Any]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    from eksft.layout import RLStageDir
    from rl.grpo.config import GRPOConfig
    from rl.grpo.trainer import GRPOTrainer
    from rl.rollout import RolloutConfig

    rows = make_rows(args.prompts, args.data_seed)
    total = args.warmup + args.steps
    cfg = GRPOConfig(bf16=args.bf16, group_size=args.group, prompts_per_step=args.prompts,
                     max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, beta_kl=0.0,
                     learning_rate=args.lr, micro_batch_size=args.micro_batch, steps=total,
                     save_every=10**6, seed=args.seed, workers=workers, packing=packing,
                     # Every backward runs, as in TRL: the embedded model's rewards here are all 0, so skipping the
                     # backward of zero-variance groups would leave a forward-only update (benchmarks/zero_gradient.py
                     # measures that saving by share of such groups).
                     skip_zero_gradient=False)
    rollout = RolloutConfig(engine="vllm", dtype=args.rollout_dtype, max_model_len=args.max_model_len,
                            kv_cache_gib=args.kv_cache_gib, num_engines=engines, weight_sync=weight_sync,
                            enforce_eager=enforce_eager)
    # engine actors (engines > 1) share this run's CPUs: rollout.num_cpus unset
    threads_before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="grpo_step_ours_") as tmp:
        t0 = time.perf_counter()
        trainer = GRPOTrainer(model_dir=model_dir(args), rows=rows, config=cfg,
                              outputs=RLStageDir(Path(tmp)).trainer_outputs(), rollout=rollout, kl_metric=False)
        init_s = time.perf_counter() - t0
        captured: dict[str, Any] = {}
        original_rollout = trainer._rollout

        def rollout_and_keep(picks, timings):
            groups = original_rollout(picks, timings)
            captured["groups"] = groups
            return groups

        trainer._rollout = rollout_and_keep
        steps = []
        try:
            for i in range(total):
                meter = CpuMeter().start()
                t = time.perf_counter()
                m = trainer.train_step()
                wall = time.perf_counter() - t
                load = meter.stop()
                trainer.step += 1
                m["step"] = trainer.step
                trainer._log(m)
                split = {k: m[f"time/{k}"] for k in ("generate", "reward", "train", "sync")}
                n_tokens = sum(len(s.completion_ids) for g in captured["groups"] for s in g.samples)
                steps.append({"step": i + 1, "warmup": i < args.warmup, "wall_s": wall, **split,
                              "other": wall - sum(split.values()), "completion_tokens": n_tokens,
                              "sequences": sum(len(g.samples) for g in captured["groups"]),
                              "response_length_mean": m.get("response_length_mean"),
                              "truncation_rate": m.get("truncation_rate"), "reward_mean": m.get("reward_mean"),
                              "logprob_gap_engine_trainer": m.get("logprob_gap_engine_trainer"),
                              "logprob_gap_per_engine": {k.split("/")[1]: v for k, v in m.items()
                                                         if k.startswith("logprob_gap/")},
                              "sync_bytes": m.get("sync/bytes"), **load})
                print(f"[ours] step {i + 1}/{total} wall {wall:.1f}s "
                      + " ".join(f"{k}={v:.1f}s" for k, v in split.items())
                      + f" tokens={n_tokens} others_cpu={load.get('others_cpu_share')}", flush=True)
            memory = worker_memory(trainer.workers)
            controller_peak_rss = peak_rss_bytes(os.getpid())
            # the profile's replicas train the in-process rank's model: workers 1 only
            profile = (profile_update(trainer, captured["groups"], args)
                       if args.profile and workers == 1 and engines == 1 and packing == "auto"
                       and enforce_eager is None else None)
        finally:
            trainer.engine.shutdown()
            trainer.workers.shutdown()
    return summarise(system or ("ours" if workers == 1 else f"ours-workers{workers}"), steps, args.warmup, {
        "init_s": init_s, "workers": workers, "engines": engines, "weight_sync": weight_sync,
        "weight_transfer": trainer.weight_transfer, "worker_memory": memory, "controller_peak_rss_bytes": controller_peak_rss,
        "torch_threads": [threads_before, torch.get_num_threads()],
        "settings": {"engine": "vllm (in-process)" if engines == 1 else f"vllm, {engines} Ray actors",
                     "rollout_dtype": args.rollout_dtype, "enforce_eager": enforce_eager,
                     "trainer_precision": "bf16 (FSDP2 mixed precision)" if args.bf16 else "float32",
                     "micro_batch_size": args.micro_batch, "beta_kl": 0.0, "kl_metric": False,
                     "aggregation": cfg.aggregation, "packing": packing, "skip_zero_gradient": False,
                     "packing_resolved": trainer.packing},
        "profile": profile,
    })


def worker_memory(group) -> list[dict[str, Any]]:
    """Per rank: bytes of parameter / gradient / AdamW shards, and its process's peak RSS (VmHWM)."""
    pids = group.pids if hasattr(group, "pids") else [os.getpid()]  # workers 1: the rank is in this process
    return [{"rank": rank, "pid": pid, **storage, "state_bytes": sum(storage.values()),
             "peak_rss_bytes": peak_rss_bytes(pid), "rss_includes_engine": not hasattr(group, "pids")}
            for rank, (storage, pid) in enumerate(zip(group.local_storage_bytes(), pids))]


def peak_rss_bytes(pid: int) -> int | None:
    """Peak resident memory of process ``pid`` (``VmHWM``), None where /proc cannot tell."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


# ---------------------------------------------------------------- profile of our update


def _padding(samples, micro: int, order: list[int]) -> dict[str, Any]:
    """Positions the forwards compute vs real tokens vs completion tokens, over micro-batches.

    As `completion_logprobs` computes them: per micro-batch, each distinct prompt once (left-padded to the
    longest), then every completion but its last token (right-padded to the longest) on the prompts' cache.
    """
    computed = real = completion = 0
    for start in range(0, len(order), micro):
        chunk = [samples[i] for i in order[start:start + micro]]
        prompts = {tuple(s.prompt_ids) for s in chunk}
        longest = max(len(s.completion_ids) for s in chunk)
        computed += len(prompts) * max(len(p) for p in prompts) + len(chunk) * max(longest - 1, 0)
        real += sum(len(p) for p in prompts) + sum(max(len(s.completion_ids) - 1, 0) for s in chunk)
        completion += sum(len(s.completion_ids) for s in chunk)
    return {"computed_positions": computed, "real_tokens": real, "completion_tokens": completion,
            "padding_share": 1 - real / computed, "completion_share_of_computed": completion / computed}


class _Timer:
    """Forward pre/post hooks that add up the wall time of a module's forwards."""

    def __init__(self, module):
        self.total, self._t = 0.0, None
        self.handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._t = time.perf_counter()

    def _post(self, *_):
        self.total += time.perf_counter() - self._t

    def remove(self):
        for h in self.handles:
            h.remove()


def timed_update(trainer, samples, advantages, *, micro: int, order: list[int], autocast_dtype) -> dict[str, Any]:
    """One on-policy update (forward + policy loss + backward per micro-batch, clip, AdamW step) with phase timings.

    The update as it was before ``rl.workers`` (``ppo_epochs=1``, one mini-batch, beta 0: `completion_logprobs`,
    each prompt once per micro-batch, and `policy_loss` with global token normalisation), on the in-process
    rank's model; ``order`` decides which samples share a micro-batch. Clipping by `rl.workers`' DTensor-aware
    `clip_grad_norm_`.
    """
    import torch

    from rl.grpo.core import policy_loss
    import rl.grpo.logprobs as logprobs_module
    from rl.grpo.logprobs import completion_logprobs
    from rl.workers.trainer_worker import clip_grad_norm_

    cfg, model = trainer.cfg, trainer.model
    body_timer, head_timer = _Timer(model.model), _Timer(model.lm_head)
    stats_time = [0.0]
    original_stats = logprobs_module.token_statistics  # completion_logprobs looks it up there

    def timed_stats(*a, **k):
        t = time.perf_counter()
        out = original_stats(*a, **k)
        stats_time[0] += time.perf_counter() - t
        return out

    logprobs_module.token_statistics = timed_stats
    n_tokens = sum(len(s.completion_ids) for s in samples)
    t_fwd = t_loss = t_bwd = 0.0
    try:
        t_all = time.perf_counter()
        trainer.optimizer.zero_grad(set_to_none=True)
        for start in range(0, len(order), micro):
            idx = order[start:start + micro]
            chunk = [samples[i] for i in idx]
            t = time.perf_counter()
            logp, entropy, mask = completion_logprobs(model, chunk, cfg.temperature, with_entropy=True,
                                                      autocast_dtype=autocast_dtype)
            adv = advantages[idx]
            t_fwd += time.perf_counter() - t
            t = time.perf_counter()
            loss, _ = policy_loss(logp, logp.detach(), adv, mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                  entropy=entropy, aggregation=cfg.aggregation, max_response_len=cfg.max_new_tokens,
                                  num_tokens=max(n_tokens, 1), num_seqs=len(samples))
            t_loss += time.perf_counter() - t
            t = time.perf_counter()
            loss.backward()
            t_bwd += time.perf_counter() - t
        t = time.perf_counter()
        clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        trainer.optimizer.step()
        t_opt = time.perf_counter() - t
        total = time.perf_counter() - t_all
    finally:
        logprobs_module.token_statistics = original_stats
        body_timer.remove()
        head_timer.remove()
    return {"total_s": total, "forward_s": t_fwd, "forward_body_s": body_timer.total,
            "forward_lm_head_s": head_timer.total, "token_statistics_s": stats_time[0], "loss_s": t_loss,
            "backward_s": t_bwd, "clip_and_optimizer_s": t_opt, **_padding(samples, micro, order)}


def update_by_packing(trainer, groups, reps: int) -> dict[str, Any]:
    """The trainer's own update (`GRPOTrainer._update`, the worker's forwards and backwards, AdamW) on the same
    rollouts with packing off, shared_prompt and padding_free, in alternating order, ``reps`` times each; and the
    positions its forwards compute: rows x longest (prompt + completion) per padded micro-batch, the packed row's
    length per packed one."""
    import dataclasses
    import resource

    from rl.common.packing import packed_length
    from rl.grpo.trainer import GRPOTrainer

    worker = trainer.workers.worker  # rl.workers: 1, in this process
    settings, packing_before = worker.settings, trainer.packing
    counted = {"positions": 0, "forwards": 0}
    original = worker._sequence_logprobs

    def counting(model, mb, with_entropy):
        if worker.packing != "off":
            counted["positions"] += packed_length(mb.prompt_ids, mb.completion_ids, worker.packing == "shared_prompt")
        else:
            counted["positions"] += len(mb) * max(len(p) + len(c) for p, c in zip(mb.prompt_ids, mb.completion_ids))
        counted["forwards"] += 1
        return original(model, mb, with_entropy)

    worker._sequence_logprobs = counting
    layouts = ("off", "shared_prompt", "padding_free")
    out: dict[str, Any] = {k: {"seconds": []} for k in layouts}
    try:
        for rep in range(reps):
            for packing in (layouts if rep % 2 == 0 else tuple(reversed(layouts))):
                worker.settings = dataclasses.replace(settings, packing=packing)
                trainer.packing = packing
                counted.update(positions=0, forwards=0)
                meter = CpuMeter().start()
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t = time.perf_counter()
                GRPOTrainer._update(trainer, groups)
                out[packing]["seconds"].append(time.perf_counter() - t)
                # pages the kernel zero-filled for this process (`rl.common.host_memory`)
                out[packing].setdefault("page_faults", []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
                out[packing].update(positions=counted["positions"], forwards=counted["forwards"],
                                    others_cpu_share=meter.stop().get("others_cpu_share"))
                print(f"[ours/profile] update, packing {packing}: {out[packing]['seconds'][-1]:.2f}s, "
                      f"{counted['positions']} positions in {counted['forwards']} forwards", flush=True)
    finally:
        worker._sequence_logprobs = original
        worker.settings, trainer.packing = settings, packing_before
    for v in out.values():
        v["median_s"] = median(v["seconds"])
    out["completion_tokens"] = sum(len(s.completion_ids) for g in groups for s in g.samples)
    out["positions_packed_over_padded"] = out["shared_prompt"]["positions"] / out["off"]["positions"]
    out["time_packed_over_padded"] = out["shared_prompt"]["median_s"] / out["off"]["median_s"]
    out["positions_padding_free_over_padded"] = out["padding_free"]["positions"] / out["off"]["positions"]
    out["time_padding_free_over_padded"] = out["padding_free"]["median_s"] / out["off"]["median_s"]
    return out


def profile_update(trainer, groups, args: argparse.Namespace) -> dict[str, Any]:
    """Where the update's time goes, on the last step's rollouts (weights keep training; timing only)."""
    import torch

    from rl.grpo.core import group_advantages, minibatches
    from rl.grpo.trainer import GRPOTrainer

    # rl.workers: 1 keeps its one FSDP2 rank in this process: the replicas below train that rank's (unsharded)
    # model and AdamW the way the single-process update before rl.workers did (completion_logprobs: each prompt
    # once per micro-batch; bf16 by autocast). The trainer's own update (timed first) is the worker's: one
    # full-sequence forward per micro-batch with FSDP mixed precision.
    trainer.model, trainer.optimizer = trainer.workers.worker.model, trainer.workers.worker.optimizer
    samples = [s for g in groups for s in g.samples]
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
    advantages = group_advantages(rewards, normalize_std=trainer.cfg.normalize_std).flatten()
    n = len(samples)
    # A random order (the seeded permutation GRPOTrainer._update draws for this step), and that order
    # sorted by total length (what _update does with it before cutting micro-batches).
    seed = trainer.cfg.seed * 7919 + trainer.step
    shuffled = minibatches(n, None, torch.Generator().manual_seed(seed))[0].tolist()
    G = len(groups[0].samples)
    group_length = [len(g.prompt_ids) + max(len(s.completion_ids) for s in g.samples) for g in groups]
    by_group = sorted(shuffled, key=lambda i: (group_length[i // G], i // G, i))  # as GRPOTrainer._update
    bf16 = torch.bfloat16 if args.bf16 else None
    out: dict[str, Any] = {
        "sequences": n,
        "completion_tokens": sum(len(s.completion_ids) for s in samples),
        "prompt_lengths": sorted({len(s.prompt_ids) for s in samples}),
        "completion_length_min_max": [min(len(s.completion_ids) for s in samples),
                                      max(len(s.completion_ids) for s in samples)],
        "lengths": [[len(s.prompt_ids), len(s.completion_ids)] for s in samples],
        "padding_random_order": {str(m): _padding(samples, m, shuffled) for m in (1, 4, 8, 16, 32, n)},
        # Padding is luck of the permutation: its mean over 200 random permutations, per micro-batch size.
        "padding_share_random_mean": {
            str(m): statistics.mean(_padding(samples, m, torch.randperm(n, generator=torch.Generator().manual_seed(k))
                                             .tolist())["padding_share"] for k in range(200))
            for m in (4, 8, 16)},
        "padding_whole_groups": {str(m): _padding(samples, m, by_group) for m in (4, 8, 16, 32)},
        "updates": [],
    }

    def record(name, **kw):
        print(f"[ours/profile] {name} ...", flush=True)
        meter = CpuMeter().start()
        r = {"variant": name, **timed_update(trainer, samples, advantages, **kw)}
        r.update(meter.stop())
        out["updates"].append(r)
        print(f"[ours/profile] {name}: {r['total_s']:.2f}s others_cpu={r.get('others_cpu_share')} (fwd {r['forward_s']:.2f} [head {r['forward_lm_head_s']:.2f},"
              f" stats {r['token_statistics_s']:.2f}] bwd {r['backward_s']:.2f} opt {r['clip_and_optimizer_s']:.2f})",
              flush=True)

    # The trainer's own update on the same batch (reference point for the replica below).
    meter = CpuMeter().start()
    t = time.perf_counter()
    GRPOTrainer._update(trainer, groups)
    out["trainer_update_s"] = time.perf_counter() - t
    out["trainer_update_cpu"] = meter.stop()
    print(f"[ours/profile] GRPOTrainer._update: {out['trainer_update_s']:.2f}s", flush=True)
    out["update_by_packing"] = update_by_packing(trainer, groups, args.packing_reps)
    if not args.profile_replicas:
        return out
    micro = args.micro_batch
    prec = "bf16" if bf16 else "fp32"
    record(f"pre-worker replica: micro {micro}, whole groups, {prec}", micro=micro, order=by_group,
           autocast_dtype=bf16)
    record(f"pre-worker replica: micro {micro}, random order, {prec}", micro=micro, order=shuffled, autocast_dtype=bf16)
    for m in args.profile_micro:
        if m != micro:
            record(f"pre-worker replica: micro {m}, whole groups, {prec}", micro=m, order=by_group, autocast_dtype=bf16)
    other = "fp32" if bf16 else "bf16"
    record(f"pre-worker replica: micro {micro}, whole groups, {other}", micro=micro, order=by_group,
           autocast_dtype=None if bf16 else torch.bfloat16)
    previous = torch.set_flush_denormal(True)
    try:
        record(f"pre-worker replica: micro {micro}, whole groups, {prec}, flush denormals", micro=micro, order=by_group,
               autocast_dtype=bf16)
    finally:
        torch.set_flush_denormal(False)
    out["flush_denormal_supported"] = previous
    # Weight sync cost alone (the engine re-packs the tied LM head, see rl.rollout.vllm_engine).
    t = time.perf_counter()
    trainer._sync_weights()
    out["sync_s"] = time.perf_counter() - t
    return out


# --------------------------------------------------------------------------------------------
# trl: trl.GRPOTrainer with transformers generate
# --------------------------------------------------------------------------------------------


def run_trl(args: argparse.Namespace, use_vllm: bool = False) -> dict[str, Any]:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer as TRLGRPOTrainer

    from rl.reward import math_reward

    rows = make_rows(args.prompts, args.data_seed)
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    per_step = args.prompts * args.group
    if per_step % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch} must divide prompts x group = {per_step}")
    calls: list[dict] = []

    def math_verify_reward(completions, answer, completion_ids=None, prompts=None, **_):
        """This project's reward (same cost as in our trainer): math_reward on the completion text."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        results = math_reward(texts, answer)
        calls.append({"completions": len(texts), "completion_tokens": sum(len(c) for c in completion_ids or []),
                      "distinct_prompts": len({json.dumps(p) for p in prompts or []}),
                      "reward_mean": sum(r.score for r in results) / len(results)})
        return [r.score for r in results]

    total = args.warmup + args.steps
    system = "trl-vllm" if use_vllm else "trl"
    with tempfile.TemporaryDirectory(prefix="grpo_step_trl_") as tmp:
        config = TRLGRPOConfig(
            output_dir=tmp, use_cpu=True, bf16=args.bf16, fp16=False, report_to="none", logging_strategy="no",
            save_strategy="no", disable_tqdm=True, max_steps=total, seed=args.seed, learning_rate=args.lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=per_step // args.micro_batch,
            num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
            top_k=0, beta=0.0, num_iterations=1, epsilon=0.2, loss_type="dapo",
            scale_rewards="group", gradient_checkpointing=False, dataloader_num_workers=0,
            model_init_kwargs={"dtype": "float32"},
            **(dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=args.trl_vllm_memory,
                    vllm_max_model_length=args.max_model_len) if use_vllm else dict(use_vllm=False)),
        )
        marks: dict[str, list[float]] = {"begin": [], "end": [], "generate": [], "reward": []}
        loads: list[dict] = []
        meters: list[CpuMeter] = []

        class StepClock(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                meters.append(CpuMeter().start())
                marks["begin"].append(time.perf_counter())

            def on_step_end(self, a, state, control, **kw):
                marks["end"].append(time.perf_counter())
                loads.append(meters[-1].stop())
                i = len(marks["end"])
                wall = marks["end"][-1] - marks["begin"][-1]
                print(f"[{system}] step {i}/{total} wall {wall:.1f}s others_cpu={loads[-1].get('others_cpu_share')}",
                      flush=True)

        t0 = time.perf_counter()
        trainer = TRLGRPOTrainer(model=model_dir(args), reward_funcs=[math_verify_reward], args=config,
                                 train_dataset=dataset, callbacks=[StepClock()])
        init_s = time.perf_counter() - t0

        def timed(name, fn):
            def wrapper(*a, **k):
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    marks[name].append(time.perf_counter() - t)
            return wrapper

        trainer._generate_single_turn = timed("generate", trainer._generate_single_turn)
        trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
        trainer.train()
    if not (len(marks["begin"]) == len(marks["end"]) == len(marks["generate"]) == len(marks["reward"]) == total):
        raise RuntimeError(f"expected one generation and one reward call per step, got "
                           f"{ {k: len(v) for k, v in marks.items()} }")
    steps = []
    for i in range(total):
        wall = marks["end"][i] - marks["begin"][i]
        gen, rew = marks["generate"][i], marks["reward"][i]
        c = calls[i]
        steps.append({"step": i + 1, "warmup": i < args.warmup, "wall_s": wall, "generate": gen, "reward": rew,
                      "train": wall - gen - rew, "sync": 0.0, "other": None, "completion_tokens": c["completion_tokens"],
                      "sequences": c["completions"], "distinct_prompts": c["distinct_prompts"],
                      "response_length_mean": c["completion_tokens"] / c["completions"],
                      "reward_mean": c["reward_mean"], **(loads[i] if i < len(loads) else {})})
    return summarise(system, steps, args.warmup, {
        "init_s": init_s, "torch_threads": torch.get_num_threads(),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
        "settings": {"engine": (f"vLLM colocated in the trainer's process (use_vllm=True, vllm_mode=colocate, "
                               f"vllm_gpu_memory_utilization={args.trl_vllm_memory})" if use_vllm
                               else "transformers generate (use_vllm=False)"), "bf16": config.bf16,
                     "per_device_train_batch_size": config.per_device_train_batch_size,
                     "gradient_accumulation_steps": config.gradient_accumulation_steps,
                     "generation_batch_size": config.generation_batch_size,
                     "steps_per_generation": config.steps_per_generation, "loss_type": config.loss_type,
                     "gradient_checkpointing": config.gradient_checkpointing, "beta": config.beta,
                     "note": "train = step wall - generate - reward (loss forwards/backwards, optimizer, "
                             "tokenisation, advantage maths)"},
    })


# --------------------------------------------------------------------------------------------
# engine: VLLMEngine.generate vs plain vllm.LLM.generate
# --------------------------------------------------------------------------------------------


def _prompt_ids(args, tokenizer) -> list[list[int]]:
    from rl.rollout import prompt_token_ids

    return prompt_token_ids(tokenizer, [r["prompt"] for r in make_rows(args.prompts, args.data_seed)])


def _plain_generate(llm, ids, args, seeds, logprobs=0):
    from vllm import SamplingParams

    params = [SamplingParams(n=args.group, temperature=1.0, top_p=1.0, max_tokens=args.max_new_tokens,
                             logprobs=logprobs, seed=None if s is None else int(s)) for s in seeds]
    outs = llm.generate([{"prompt_token_ids": list(i)} for i in ids], params, use_tqdm=False)
    return [[list(o.token_ids) for o in out.outputs] for out in outs]


def run_engine(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from rl.rollout import SamplingConfig
    from rl.rollout.vllm_engine import VLLMEngine

    t0 = time.perf_counter()
    engine = VLLMEngine(model_dir(args), dtype=args.rollout_dtype, max_model_len=args.max_model_len,
                        kv_cache_gib=args.kv_cache_gib, seed=args.seed)
    init_s = time.perf_counter() - t0
    ids = _prompt_ids(args, engine.tokenizer)
    sampling = SamplingConfig(n=args.group, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)

    def ours(seeds):
        out = engine.generate(ids, sampling, seeds)
        return [[s.completion_ids for s in group] for group in out]

    arms = {
        "VLLMEngine.generate": ours,
        "vllm.LLM.generate (same LLM, same params)": lambda seeds: _plain_generate(engine.llm, ids, args, seeds),
        "vllm.LLM.generate (same LLM, no per-request seed)":
            lambda seeds: _plain_generate(engine.llm, ids, args, [None] * len(seeds)),
    }
    results: dict[str, dict[str, list]] = {k: {"s": [], "tokens": [], "load": []} for k in arms}
    identical = []
    try:
        for name, fn in arms.items():  # warm-up every arm once
            fn([10_000 + i for i in range(len(ids))])
        for rep in range(args.engine_reps):
            seeds = [1000 * rep + i for i in range(len(ids))]
            names = list(arms) if rep % 2 == 0 else list(reversed(arms))  # alternate the order
            tokens_seen = {}
            for name in names:
                meter = CpuMeter().start()
                t = time.perf_counter()
                toks = arms[name](seeds)
                dt = time.perf_counter() - t
                load = meter.stop()
                results[name]["s"].append(dt)
                results[name]["tokens"].append(sum(len(c) for g in toks for c in g))
                results[name]["load"].append(load)
                tokens_seen[name] = toks
                print(f"[engine] rep {rep} {name}: {dt:.2f}s {results[name]['tokens'][-1]} tokens "
                      f"others_cpu={load.get('others_cpu_share')}", flush=True)
            a, b = list(arms)[:2]
            identical.append(tokens_seen[a] == tokens_seen[b])
    finally:
        engine.shutdown()
    arms_out = []
    for name, r in results.items():
        tok_s = sum(r["tokens"]) / sum(r["s"])
        arms_out.append({"arm": name, "tokens_per_s": tok_s, "seconds": r["s"], "tokens": r["tokens"], "loads": r["load"]})
    return {"system": "engine", "status": "ok", "init_s": init_s, "reps": args.engine_reps,
            "rollout_dtype": args.rollout_dtype, "arms": arms_out, "same_tokens_ours_vs_plain": identical,
            "tokens_per_s_ours": arms_out[0]["tokens_per_s"], "tokens_per_s_plain": arms_out[1]["tokens_per_s"]}


def run_plain_default(args: argparse.Namespace) -> dict[str, Any]:
    """A fresh vllm.LLM with vLLM's own defaults (engine core in its own process, compilation as vLLM picks)."""
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=model_dir(args), dtype=args.rollout_dtype, max_model_len=args.max_model_len, seed=args.seed,
              kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30))
    init_s = time.perf_counter() - t0
    ids = _prompt_ids(args, llm.get_tokenizer())
    _plain_generate(llm, ids, args, [10_000 + i for i in range(len(ids))])
    secs, tokens = [], []
    for rep in range(args.engine_reps):
        t = time.perf_counter()
        toks = _plain_generate(llm, ids, args, [1000 * rep + i for i in range(len(ids))])
        secs.append(time.perf_counter() - t)
        tokens.append(sum(len(c) for g in toks for c in g))
        print(f"[plain-default] rep {rep}: {secs[-1]:.2f}s {tokens[-1]} tokens", flush=True)
    return {"system": "plain-default", "status": "ok", "init_s": init_s, "seconds": secs, "tokens": tokens,
            "tokens_per_s": sum(tokens) / sum(secs)}


# --------------------------------------------------------------------------------------------
# Parent: children, merge, tables
# --------------------------------------------------------------------------------------------

CHILDREN = {"ours": run_ours, "ours-workers2": lambda args: run_ours(args, workers=2),
            "ours-padded": lambda args: run_ours(args, packing="off", system="ours-padded"),
            "ours-compiled": lambda args: run_ours(args, enforce_eager=False, system="ours-compiled"),
            "trl-vllm": lambda args: run_trl(args, use_vllm=True),
            "ours-reload": lambda args: run_ours(args, weight_sync="reload", system="ours-reload"),
            "ours-engines2": lambda args: run_ours(args, engines=2, system="ours-engines2"),
            "ours-engines2-reload": lambda args: run_ours(args, engines=2, weight_sync="reload",
                                                          system="ours-engines2-reload"), "trl": run_trl,
            "engine": run_engine, "plain-default": run_plain_default}


def run_child(args: argparse.Namespace, system: str, extra_argv: tuple[str, ...] = ()) -> dict[str, Any]:
    # echo the children's progress lines ("[ours] ...", not torch's "[W ..." warnings)
    child = _child.run_child(__file__, system, [*sys.argv[1:], *_precision.pinned_argv(args), *extra_argv],
                             timeout_s=args.child_timeout,
                             echo=lambda line: line.startswith("[") and not line.startswith("[W"))
    if child.timed_out:
        return {"system": system, "status": "timeout", "error": f"child exceeded {args.child_timeout} s"}
    if child.ok:
        return {**child.result, "child_wall_s": child.wall_s}
    return {"system": system, "status": "failed", "returncode": child.returncode, "error": child.log[-3000:]}


def _get(rows, system):
    return next((r for r in rows if r.get("system") == system and r.get("status") == "ok"), None)


def compute_ratios(rows: list[dict]) -> dict[str, float | None]:
    ours, trl, engine, plain = _get(rows, "ours"), _get(rows, "trl"), _get(rows, "engine"), _get(rows, "plain-default")
    ours2, padded, trl_vllm = _get(rows, "ours-workers2"), _get(rows, "ours-padded"), _get(rows, "trl-vllm")
    compiled = _get(rows, "ours-compiled")
    engines2, engines2_store = _get(rows, "ours-engines2"), _get(rows, "ours-engines2-reload")

    def ratio(a, b):
        return a / b if a and b else None

    split = lambda r, k: (r or {}).get("time_split_s", {}).get(k)  # noqa: E731
    by_round = {f"ours_steps_per_s_over_{name}_by_round": ratios_by_round(other, ours)
                for name, other in (("trl", trl), ("trl_vllm", trl_vllm), ("padded", padded))}
    by_round["ours_compiled_steps_per_s_over_trl_by_round"] = ratios_by_round(trl, compiled)
    return {
        "ours_steps_per_s_over_trl": ratio((trl or {}).get("step_time_s"), (ours or {}).get("step_time_s")),
        "ours_steps_per_s_over_trl_vllm": ratio((trl_vllm or {}).get("step_time_s"), (ours or {}).get("step_time_s")),
        "ours_steps_per_s_over_padded": ratio((padded or {}).get("step_time_s"), (ours or {}).get("step_time_s")),
        "ours_train_time_over_padded": ratio(split(ours, "train"), split(padded, "train")),
        "padded_steps_per_s_over_trl": ratio((trl or {}).get("step_time_s"), (padded or {}).get("step_time_s")),
        "ours_compiled_steps_per_s_over_trl": ratio((trl or {}).get("step_time_s"), (compiled or {}).get("step_time_s")),
        "ours_compiled_over_ours_generate_tokens_per_s": ratio((compiled or {}).get("generate_tokens_per_s"),
                                                               (ours or {}).get("generate_tokens_per_s")),
        "ours_compiled_over_ours_init_time": ratio((compiled or {}).get("init_s"), (ours or {}).get("init_s")),
        "ours_steps_per_s_over_trl_min_step": ratio((trl or {}).get("step_time_s_min"),
                                                    (ours or {}).get("step_time_s_min")),
        "ours_over_trl_per_completion_token": ratio((trl or {}).get("s_per_1k_completion_tokens"),
                                                    (ours or {}).get("s_per_1k_completion_tokens")),
        "ours_over_trl_generate_tokens_per_s": ratio((ours or {}).get("generate_tokens_per_s"),
                                                     (trl or {}).get("generate_tokens_per_s")),
        "trl_train_over_ours_train_time": ratio(split(trl, "train"), split(ours, "train")),
        "engine_tokens_per_s_over_plain_vllm": ratio((engine or {}).get("tokens_per_s_ours"),
                                                     (engine or {}).get("tokens_per_s_plain")),
        "engine_tokens_per_s_over_plain_vllm_defaults": ratio((engine or {}).get("tokens_per_s_ours"),
                                                              (plain or {}).get("tokens_per_s")),
        "workers2_over_workers1_step_time": ratio((ours2 or {}).get("step_time_s"), (ours or {}).get("step_time_s")),
        "workers2_over_workers1_train_time": ratio(split(ours2, "train"), split(ours, "train")),
        "workers2_over_workers1_state_bytes_per_rank": ratio(
            max((m["state_bytes"] for m in (ours2 or {}).get("worker_memory", [])), default=None),
            max((m["state_bytes"] for m in (ours or {}).get("worker_memory", [])), default=None)),
        "engines2_transfer_over_object_store_sync_time": ratio(split(engines2, "sync"), split(engines2_store, "sync")),
        **{k: v for k, v in by_round.items() if v},
    }


def ratios_by_round(baseline: dict | None, ours: dict | None) -> list[float | None] | None:
    """Round r's ``baseline`` median step over round r's ``ours`` (steps/s of ours over the baseline's), per round;
    None without rounds."""
    a, b = (baseline or {}).get("rounds"), (ours or {}).get("rounds")
    if not a or not b:
        return None
    return [x["step_time_s"] / y["step_time_s"] if x and y else None for x, y in zip(a, b)]


def _f(x, d=2):
    if x is None:
        return "-"
    if isinstance(x, list):
        return ", ".join(_f(v, d) for v in x)
    return f"{x:.{d}f}" if isinstance(x, float) else str(x)


def markdown(result: dict[str, Any]) -> str:
    c, rows, ratios = result["config"], result["rows"], result["ratios"]
    lines = [
        f"### grpo_step: {c['model']}, {c['prompts']} prompts x {c['group']} samples x <= {c['max_new_tokens']} new tokens, "
        f"{c['steps']} timed steps after {c['warmup']} warm-up, CPU ({c['cpu_count']} cores), "
        f"trainer {'bf16' if c['bf16'] else 'float32'}, vLLM {c['rollout_dtype']}, micro-batch {c['micro_batch']}",
        "",
        _precision.header(result["precision"]),
        "",
        "| system | step s (median) | step s (min) | generate s | reward s | train s | sync s | other s "
        "| completion tokens/step | s / 1k completion tokens | generate tok/s | reward mean | others' CPU share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("system") not in ("ours", "ours-padded", "ours-compiled", "ours-workers2", "ours-engines2",
                                   "ours-reload", "ours-engines2-reload", "trl", "trl-vllm"):
            continue
        if r.get("status") != "ok":
            error = " ".join(str(r.get("error", "")).split())[-300:].replace("|", "/")
            lines.append(f"| {r['system']} | {r.get('status')}: {error} | | | | | | | | | | | |")
            continue
        s = r["time_split_s"]
        others = ", ".join(_f(x) for x in r.get("others_cpu_share_per_step", []))
        lines.append(f"| {r['system']} | {_f(r['step_time_s'])} | {_f(r['step_time_s_min'])} | {_f(s['generate'])} | {_f(s['reward'])} | "
                     f"{_f(s['train'])} | {_f(s['sync'])} | {_f(s['other'])} | {_f(r['completion_tokens_per_step'])} | "
                     f"{_f(r['s_per_1k_completion_tokens'])} | {_f(r['generate_tokens_per_s'], 0)} | "
                     f"{_f(r['reward_mean'], 3)} | {others} |")
    started = [r for r in rows if r.get("status") == "ok" and r.get("init_s") is not None and "time_split_s" in r]
    if started:
        lines += ["", "Start-up s (trainer and rollout engine built, before the first step; first round): "
                  + "; ".join(f"{r['system']} {_f(r['init_s'], 1)}" for r in started) + "."]
    rounds = [r for r in rows if r.get("rounds")]
    if rounds:
        lines += ["", f"Rounds ({c['rounds']}, the order reversed every other round; each row above pools the timed "
                      "steps of all its rounds): median step s per round:", ""]
        lines += [f"- {r['system']}: {_f([(x or {}).get('step_time_s') for x in r['rounds']])}"
                  + "".join(f"; round {e['round'] + 1} {e['status']}" for e in r.get("round_errors", []))
                  for r in rounds]
    scaling = [r for r in rows if r.get("status") == "ok" and r.get("worker_memory")]
    if scaling:
        lines += ["", "Scaling (rl.workers): per rank, MB of parameter + gradient + AdamW shards, and the rank's process "
                      "peak RSS (at 1 worker the rank shares the controller's process and its vLLM engine):", "",
                  "| system | workers | step s (median) | train s | sync s | state MB per rank | peak RSS MB per rank "
                  "| controller peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in scaling:
            mem = r["worker_memory"]
            state = ", ".join(_f(m["state_bytes"] / 2**20, 1) for m in mem)
            rss = ", ".join(_f(m["peak_rss_bytes"] / 2**20, 0) if m["peak_rss_bytes"] else "-" for m in mem)
            lines.append(f"| {r['system']} | {r['workers']} | {_f(r['step_time_s'])} | {_f(r['time_split_s']['train'])} | "
                         f"{_f(r['time_split_s']['sync'])} | {state} | {rss} | "
                         f"{_f((r.get('controller_peak_rss_bytes') or 0) / 2**20, 0)} |")
    engine = _get(rows, "engine")
    if engine:
        lines += ["", f"Rollout throughput (vLLM {engine['rollout_dtype']}, one process, after warm-up, "
                      f"{engine['reps']} alternating reps; identical tokens ours vs plain: "
                      f"{all(engine['same_tokens_ours_vs_plain'])}):", "",
                  "| arm | tokens/s | seconds per call |", "|---|---|---|"]
        for a in engine["arms"]:
            lines.append(f"| {a['arm']} | {_f(a['tokens_per_s'], 0)} | {', '.join(_f(x) for x in a['seconds'])} |")
        plain = _get(rows, "plain-default")
        if plain:
            lines.append(f"| fresh vllm.LLM with vLLM defaults (separate child) | {_f(plain['tokens_per_s'], 0)} | "
                         f"{', '.join(_f(x) for x in plain['seconds'])} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {_f(v)} |" for k, v in ratios.items()]
    ours = _get(rows, "ours")
    prof = (ours or {}).get("profile")
    packing = (prof or {}).get("update_by_packing")
    if packing:
        lines += ["", f"The trainer's update (`GRPOTrainer._update`: forwards, backwards, AdamW) on the last step's "
                      f"rollouts ({packing['completion_tokens']} completion tokens) in each packing layout, in "
                      f"alternating order:", "",
                  "| packing | update s (median) | runs s | positions computed | forwards | page faults |",
                  "|---|---|---|---|---|---|"]
        for k in ("off", "shared_prompt", "padding_free"):
            v = packing[k]
            faults = ", ".join(str(x) for x in v.get("page_faults", [])) or "-"  # not recorded before rl.common.host_memory
            lines.append(f"| {k} | {_f(v['median_s'])} | {', '.join(_f(x) for x in v['seconds'])} | {v['positions']} | "
                         f"{v['forwards']} | {faults} |")
        lines += ["", f"shared_prompt / off: positions {_f(packing['positions_packed_over_padded'], 3)}, update time "
                      f"{_f(packing['time_packed_over_padded'], 3)}; padding_free / off: positions "
                      f"{_f(packing['positions_padding_free_over_padded'], 3)}, update time "
                      f"{_f(packing['time_padding_free_over_padded'], 3)}."]
    if prof and prof["updates"]:
        lines += ["", f"Profile of our update on the last step's {prof['sequences']} sequences "
                      f"({prof['completion_tokens']} completion tokens; the trainer's own `_update`: "
                      f"{_f(prof['trainer_update_s'])} s; weight sync {_f(prof.get('sync_s'))} s):", "",
                  "| variant | total s | forward s | of it: body | of it: LM head | token stats | loss | backward s "
                  "| clip+AdamW s | padding share | completion share of computed positions |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for u in prof["updates"]:
            lines.append(f"| {u['variant']} | {_f(u['total_s'])} | {_f(u['forward_s'])} | {_f(u['forward_body_s'])} | "
                         f"{_f(u['forward_lm_head_s'])} | {_f(u['token_statistics_s'])} | {_f(u['loss_s'])} | "
                         f"{_f(u['backward_s'])} | {_f(u['clip_and_optimizer_s'])} | {_f(u['padding_share'])} | "
                         f"{_f(u['completion_share_of_computed'])} |")
    if prof and prof["updates"]:
        rnd = prof.get("padding_share_random_mean", {})
        grp = prof.get("padding_whole_groups", {})
        lines += ["", "Padding share of the positions the forwards compute, by micro-batch size: "
                      + "; ".join(f"{m}: mean over random orders {_f(rnd.get(m))}, whole groups "
                                  f"{_f((grp.get(m) or {}).get('padding_share'))} (completion share "
                                  f"{_f((grp.get(m) or {}).get('completion_share_of_computed'))})"
                                  for m in ("4", "8", "16"))
                      + f". Prompt lengths {prof['prompt_lengths']}, completion lengths "
                        f"{prof['completion_length_min_max'][0]}-{prof['completion_length_min_max'][1]}."]
    if result.get("notes"):
        lines += [""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def run_parent(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.plain_default and "plain-default" not in systems:
        systems.append("plain-default")
    runs: dict[str, list[dict]] = {s: [] for s in systems}

    def run(system: str, rnd: int) -> None:
        print(f"== {system}" + (f" (round {rnd + 1}/{args.rounds})" if system not in ONCE and args.rounds > 1 else ""),
              flush=True)
        row = run_child(args, system, () if rnd == 0 else ("--no-profile",))
        if row.get("status") != "ok":
            print(f"== {system}: {row.get('status')}\n{row.get('error', '')[-2000:]}", flush=True)
        runs[system].append(row)

    stepped = [s for s in systems if s not in ONCE]
    t0 = time.perf_counter()
    for rnd in range(args.rounds):
        for system in stepped if rnd % 2 == 0 else stepped[::-1]:
            run(system, rnd)
    for system in systems:
        if system in ONCE:
            run(system, 0)
    rows = [merge_rounds(system, runs[system]) for system in systems]
    config = {k: v for k, v in vars(args).items() if k not in ("child", "json_out")}
    config["cpu_count"] = os.cpu_count()
    result = {
        "benchmark": "grpo_step",
        "config": config,
        "precision": _precision.record(args),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "total_wall_s": time.perf_counter() - t0,
        "rows": rows,
        "ratios": compute_ratios(rows),
        "notes": [
            "Step time of ours = wall time of GRPOTrainer.train_step(); of TRL = on_step_begin -> on_step_end.",
            "TRL: train = step - generate - reward (includes its loss forward/backward and optimizer step).",
            "Both trainers: float32 weights + AdamW, bf16 compute when bf16 is on (ours: FSDP2's mixed-precision "
            "policy; TRL: autocast); no reference model (beta 0).",
            "The 2 CPU cores are shared: others_cpu_share (CPU time of other processes / wall x cores, from "
            "/proc/stat) is recorded for every timed step; 0 = quiet machine.",
        ],
    }
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward, both trainers")
    p.add_argument("--lr", type=float, default=1e-6)
    _precision.add_precision_args(p)  # --bf16 / --no-bf16 (both trainers), --rollout-dtype; default auto
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma list of ours, ours-padded (rl.packing: off), ours-workers2 (rl.workers: 2, the scaling "
                        "row), ours-engines2, ours-reload, ours-engines2-reload, trl, trl-vllm, engine, plain-default")
    p.add_argument("--plain-default", action="store_true", help="also time a fresh vllm.LLM with vLLM's defaults")
    p.add_argument("--engine-reps", type=int, default=2)
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="profile our update on the last rollout batch (ours child)")
    p.add_argument("--profile-micro", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16, 32],
                   help="extra micro-batch sizes timed by --profile-replicas (whole groups)")
    p.add_argument("--profile-replicas", action=argparse.BooleanOptionalAction, default=False,
                   help="with --profile, also time replicas of the update before rl.workers, by phase")
    p.add_argument("--packing-reps", type=int, default=2, help="updates per packing setting timed by --profile")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the step systems this many times, the order reversed every other round (see above)")
    p.add_argument("--trl-vllm-memory", type=float, default=0.3,
                   help="trl-vllm: vllm_gpu_memory_utilization (TRL's default 0.3; vLLM-CPU counts the memory the "
                        "trainer's process already holds against it: 0.05 failed with the embedded model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=1)
    p.add_argument("--child-timeout", type=float, default=1800)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/grpo_step_<capability tag>.json, "
                                 "e.g. grpo_step_cpu-avx2.json)")
    p.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    _precision.resolve(args)  # the parent's values reach the children through pinned_argv
    if args.out is None:
        args.out = _results.default_path("grpo_step", _precision.record(args)["hardware"]["tag"])
    if args.child:
        _results.write_json(args.json_out, CHILDREN[args.child](args))
        return 0
    _child.stop_children_on_signal()
    result = run_parent(args)
    table = markdown(result)
    _results.write_results(args.out, result, table)
    print(table)
    return 0 if all(r.get("status") == "ok" for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
