"""The GRPO loop. It reads like the algorithm; engines, rewards, the maths and the sharded training live elsewhere.

    for step in steps:
        groups  = generate G completions per prompt           (rollout engine, vLLM by default)
        rewards = reward_fn(completions, answers)              (default: math_reward, math-verify in a bounded pool)
        adv     = advantage_fn(rewards)                        (default: group_advantages; dynamic sampling
                                                                refills zero-variance groups)
        old / ref log-probs                                    (workers.logprobs; on policy no old pass)
        for epoch, mini-batch: workers.update(micro-batches)   (FSDP2 ranks, rl.workers)
        sync the engines                                       (vLLM's weight transfer from rank 0, or reload)
        checkpoint every N steps: workers' sharded weights + optimizer, data position, RNG -> exact resume

This process is the single controller: rollouts, rewards, advantages, dynamic sampling, metrics, the prompt
stream and the RNG live here; the policy, the reference and the optimizer live in the trainer worker group
(`rl.workers`): ``rl.workers: N`` Ray actors, or ``rl.workers: 1`` the same worker code in this process.

Outputs (``rl.grpo.outputs.GRPOOutputs``, placed by the caller)::

    metrics                    one line per step
    rollouts/<step N>.jsonl    prompts, completions, rewards
    checkpoints/<step N>/      consolidated HF model dir (what evaluations and the next stage read)
                               + dcp/ (sharded weights and AdamW, torch.distributed.checkpoint)
                               + trainer_state.pt (step, data position, RNG) [+ adapter/ with LoRA]
    final                      the final model (consolidated HF dir)
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rl.grpo.config import GRPOConfig
from rl.grpo.core import fill_groups, group_advantages, loss_has_gradient, minibatches, zero_variance_groups
from rl.grpo.outputs import GRPOOutputs
from rl.metrics import pass_at_k_groups, power_of_two_ks
from rl.common.packing import resolve_packing
from rl.common.precision import resolve_bf16, slow_bf16_warning, stage_device
from rl.common.resume import latest_complete_checkpoint, truncate_metrics
from rl.rollout import RolloutConfig, Sample, SamplingConfig, engine_from_config, prompt_token_ids

DCP_DIR = "dcp"  # inside checkpoints/step-N/: the worker group's sharded state


@dataclass
class Group:
    row: dict  # {"prompt": messages, "answer": str, ...}
    prompt_ids: list[int]
    samples: list[Sample]
    rewards: list[float]
    correct: list[bool]


class PromptStream:
    """Deterministic, resumable order over the rows: a fresh seeded permutation every epoch."""

    def __init__(self, n_rows: int, seed: int, cursor: int = 0):
        self.n_rows, self.seed, self.cursor = n_rows, seed, cursor

    def take(self, k: int) -> list[tuple[int, int]]:
        """``k`` (stream position, row index) pairs; the position seeds that prompt's sampling."""
        out = []
        for _ in range(k):
            epoch, offset = divmod(self.cursor, self.n_rows)
            order = torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append((self.cursor, int(order[offset])))
            self.cursor += 1
        return out


class GRPOTrainer:
    """``reward_fn(texts, answers) -> [result with .score and .correct]`` scores completions (default
    `rl.reward.math_reward` with the config's timeout, format weight and fallback); ``advantage_fn(rewards)``
    maps [prompts, G] rewards to advantages of the same shape (default `group_advantages` with
    ``normalize_std``)."""

    def __init__(self, *, model_dir: str, rows: list[dict], config: GRPOConfig, outputs: GRPOOutputs,
                 rollout: RolloutConfig | None = None, reference_dir: str | None = None,
                 trust_remote_code: bool = False, kl_metric: bool = True,
                 trackers: list | None = None, chat_template_kwargs: dict | None = None,
                 reward_fn: Callable | None = None, advantage_fn: Callable | None = None):
        from transformers import AutoTokenizer

        from rl.workers import WorkerSettings, make_worker_group

        if not rows:
            raise ValueError("GRPO needs at least one {prompt, answer} row")
        self.cfg, self.rows = config, rows
        self.rollout_cfg = rollout or RolloutConfig()
        self.out = outputs
        self.out.metrics.parent.mkdir(parents=True, exist_ok=True)
        self.trust_remote_code = trust_remote_code
        self.trackers = trackers or []
        self.step, self.stream = 0, PromptStream(len(rows), config.seed)
        self.reward_fn = reward_fn or _default_reward(config)
        self.advantage_fn = advantage_fn or functools.partial(group_advantages, normalize_std=config.normalize_std)

        resume_dir = self.latest_checkpoint()
        if resume_dir and not (resume_dir / DCP_DIR).is_dir():  # refused before an engine or a worker starts
            raise ValueError(f"{resume_dir} has no {DCP_DIR}/ (a checkpoint of the single-process trainer before "
                             "rl.workers): it cannot be resumed; delete the stage's checkpoints and start it again")
        start_dir = str(resume_dir) if resume_dir else model_dir
        self.device = stage_device()
        if config.cpu_offload and self.device != "cuda":
            raise ValueError(f"rl.cpu_offload moves the sharded state between GPU and CPU memory; this stage runs on "
                             f"{self.device}, where it already lives in CPU memory: set rl.cpu_offload: false")
        self.precision = resolve_bf16(config.bf16, self.device)
        # Packing (rl.common.packing) fixes how mini- and micro-batches are cut here and how the workers lay out
        # their forwards: resolved once, for this stage's device kind, and passed to the workers as resolved.
        self.packing = packing = resolve_packing(config.packing, self.device)
        print(f"[rl] trainer compute: {self.precision.describe()}, {config.workers} worker(s), packing {packing}",
              flush=True)
        if warning := slow_bf16_warning(self.precision, "rl.bf16"):
            print(f"[rl] WARNING: {warning}", flush=True)
        self.tokenizer = AutoTokenizer.from_pretrained(start_dir, trust_remote_code=trust_remote_code)
        self.prompt_ids = prompt_token_ids(self.tokenizer, [r["prompt"] for r in rows], chat_template_kwargs)
        # The engine first: an in-process vLLM makes this process's (one-rank) process group, which a
        # worker in this process then joins.
        self.engine = engine_from_config(self.rollout_cfg, start_dir, seed=config.seed,
                                         trust_remote_code=trust_remote_code, trainer_shares_gpu=True)
        # On a GPU the in-process engine sleeps while the trainer updates (see `_update_and_sync`)
        self.engine_sleeps = bool(getattr(self.engine, "sleeps", False))
        self.needs_ref = config.beta_kl > 0 or kl_metric
        # The reference: another model when given, else the starting model (with LoRA: the base, adapters off).
        other_reference = reference_dir is not None and Path(reference_dir).resolve() != Path(model_dir).resolve()
        if not self.needs_ref or (config.lora.enabled and not other_reference):
            reference = None
        else:
            reference = reference_dir or model_dir
        # The workers always load the starting model (with LoRA: the base) and a resumed run then reads the
        # sharded checkpoint over it.
        settings = WorkerSettings.from_grpo(config, model_dir=model_dir, reference_dir=reference,
                                            trust_remote_code=trust_remote_code, packing=packing)
        try:
            self.workers = make_worker_group(settings, config.workers, **_ray_options(config, self.device))
        except BaseException:
            self.engine.shutdown()
            raise
        try:
            self.weight_transfer = self._join_weight_transfer()
        except BaseException:
            self.workers.shutdown()
            self.engine.shutdown()
            raise
        if resume_dir:
            try:
                self._load_state(resume_dir)
            except BaseException:  # a worker died while loading: tear the group and the engine down too
                self.workers.shutdown()
                self.engine.shutdown()
                raise
            print(f"[rl] resumed from {resume_dir} (step {self.step})", flush=True)
        truncate_metrics(self.out.metrics, self.step)  # steps after the checkpoint are logged again

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path:
        from tqdm.auto import tqdm

        cfg = self.cfg
        try:
            try:
                with tqdm(total=cfg.steps, initial=self.step, desc="grpo", unit="step", dynamic_ncols=True) as bar:
                    while self.step < cfg.steps:
                        metrics = self.train_step()
                        self.step += 1
                        metrics["step"] = self.step
                        self._log(metrics)
                        if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                            self.save_checkpoint()
                        bar.update(1)
            finally:
                self.engine.shutdown()
            self.workers.save_hf(self.out.final)
        except Exception as err:
            from rl.workers import WorkerFailure

            if isinstance(err, WorkerFailure):  # the group is torn down below; a rerun resumes
                last = self.latest_checkpoint()
                print(f"[rl] FAILED at step {self.step + 1}: {err}; a rerun resumes from "
                      f"{last or 'the start'}", flush=True)
            raise
        finally:
            self.workers.shutdown()  # a broken group: its actors are killed, not asked
        return self.out.final

    def train_step(self) -> dict:
        cfg = self.cfg
        timings = {"generate": 0.0, "reward": 0.0, "train": 0.0, "sync": 0.0}
        if cfg.dynamic_sampling:
            # DAPO: keep groups whose rewards differ, sampling further prompts until the batch is full.
            candidates = (self._rollout(self.stream.take(cfg.prompts_per_step), timings) for _ in itertools.count())
            groups, fill = fill_groups(candidates, cfg.prompts_per_step, cfg.max_sampling_rounds)
            sampling = {"zero_variance_share": fill.num_zero_variance / max(fill.num_candidates, 1),
                        "sampling_rounds": fill.rounds, "groups_seen": fill.num_candidates}
        else:
            groups = self._rollout(self.stream.take(cfg.prompts_per_step), timings)
            sampling = {"sampling_rounds": 1, "groups_seen": len(groups)}
        self._save_rollouts(groups)
        metrics = {**self._rollout_metrics(groups), **sampling}
        if groups:
            metrics.update(self._update_and_sync(groups, timings))
        n_tokens = sum(len(s.completion_ids) for g in groups for s in g.samples)
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        metrics["tokens_per_s"] = n_tokens / max(timings["generate"], 1e-9)
        return metrics

    def _update_and_sync(self, groups: list[Group], timings: dict) -> dict:
        """Update the policy on ``groups``, then have the engines serve the new weights.

        An engine sharing the trainer's GPU (``engine_sleeps``) sleeps at level 2 during the update: its weights and
        KV cache are dropped, not copied to host memory, since every weight is sent again right after. It wakes
        with room for the weights first, takes them, and only then allocates its KV cache, so that the update's
        buffers and the KV cache are never alive together. Prepared, not run on a GPU (vLLM has no sleep mode on
        CPU).
        """
        if self.engine_sleeps:
            self.engine.sleep(level=2)
        t = time.perf_counter()
        metrics = self._update(groups)
        timings["train"] = time.perf_counter() - t
        t = time.perf_counter()
        if self.engine_sleeps:
            self.engine.wake_up(["weights"])
        metrics.update(self._sync_weights())
        if self.engine_sleeps:
            self.engine.wake_up(["kv_cache"])
        timings["sync"] = time.perf_counter() - t
        return metrics

    def _join_weight_transfer(self) -> bool:
        """Connect the workers' rank 0 to the engines through vLLM's weight-transfer API when it can reach them:
        engines in Ray actors, or an engine and a one-rank group both in this process. False: weights go through
        the engines' reload (`rl.rollout.RolloutEngine.update_weights`)."""
        from rl.rollout.ray_engine import RayEngine
        from rl.workers import InProcessWorkerGroup

        transfer_target = getattr(self.engine, "transfer_target", None)
        target = transfer_target(int(self.rollout_cfg.bucket_mb * 2**20)) if transfer_target else None
        if target is None or not (isinstance(self.engine, RayEngine) or isinstance(self.workers, InProcessWorkerGroup)):
            return False
        self.workers.init_weight_transfer(target)
        print(f"[rl] weights reach {len(target.engines)} engine(s) through vLLM's weight transfer ({target.backend}, "
              f"{self.rollout_cfg.bucket_mb:g} MiB buckets)", flush=True)
        return True

    def _sync_weights(self) -> dict:
        """The engines serve the workers' current weights; what was sent (``sync/bytes``, ``sync/buckets``)."""
        if self.weight_transfer:
            return {f"sync/{k}": v for k, v in self.workers.send_weights().items()}
        self.engine.update_weights(self.workers.iter_full_weights())
        return {}

    def _rollout(self, picks: list[tuple[int, int]], timings: dict) -> list[Group]:
        cfg = self.cfg
        sampling = SamplingConfig(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                                  max_new_tokens=cfg.max_new_tokens)
        seeds = [cfg.seed * 1_000_003 + position for position, _ in picks]
        t = time.perf_counter()
        outputs = self.engine.generate([self.prompt_ids[r] for _, r in picks], sampling, seeds)
        timings["generate"] += time.perf_counter() - t
        t = time.perf_counter()
        texts = [s.text for samples in outputs for s in samples]
        answers = [self.rows[r]["answer"] for _, r in picks for _ in range(cfg.group_size)]
        results = self.reward_fn(texts, answers)
        timings["reward"] += time.perf_counter() - t
        groups = []
        for j, ((_, r), samples) in enumerate(zip(picks, outputs)):
            res = results[j * cfg.group_size : (j + 1) * cfg.group_size]
            groups.append(Group(self.rows[r], self.prompt_ids[r], samples, [x.score for x in res], [x.correct for x in res]))
        return groups

    def _update(self, groups: list[Group]) -> dict:
        """Several mini-batch updates of the worker group on one rollout batch; returns averaged loss metrics."""
        from rl.workers import MicroBatch

        cfg = self.cfg
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
        advantages = self.advantage_fn(rewards).flatten().tolist()
        samples = [s for g in groups for s in g.samples]
        G = cfg.group_size
        group_length = [len(g.prompt_ids) + max(len(s.completion_ids) for s in g.samples) for g in groups]
        # Overlong masking and empty completions: out of the loss and of every count.
        trained = [bool(s.completion_ids) and not (cfg.mask_truncated and s.truncated) for s in samples]
        n = len(samples)
        on_policy = cfg.ppo_epochs == 1 and (cfg.mini_batch_size is None or cfg.mini_batch_size >= n)
        num_engines = getattr(self.engine, "num_engines", 1)
        # Groups whose loss has no gradient (all advantages 0: every reward equal) get micro-batches of their own in
        # the update, which then run no backward (`rl.workers.WorkerSettings.skip_zero_gradient`).
        no_gradient = [cfg.skip_zero_gradient and not loss_has_gradient(
            advantages[g * G:(g + 1) * G], trained[g * G:(g + 1) * G], beta=cfg.beta_kl, alpha=cfg.alpha_entropy)
            for g in range(len(groups))]

        def chunks(indices: list[int], apart: bool) -> list[list[int]]:
            if not apart:
                return self._micro_batch_chunks(indices, samples)
            parts = ([i for i in indices if not no_gradient[i // G]], [i for i in indices if no_gradient[i // G]])
            return [chunk for part in parts if part for chunk in self._micro_batch_chunks(part, samples)]

        def micro_batches(indices: list[int], old=None, ref=None, engine: bool = False,
                          update: bool = False) -> list[MicroBatch]:
            return [MicroBatch([samples[i].prompt_ids for i in idx], [samples[i].completion_ids for i in idx],
                               [advantages[i] for i in idx],
                               None if old is None else [old[i] for i in idx],
                               None if ref is None else [ref[i] for i in idx],
                               [trained[i] for i in idx],
                               [samples[i].logprobs for i in idx] if engine else None,
                               [samples[i].engine for i in idx] if engine else None, num_engines)
                    for idx in chunks(indices, apart=update)]

        # old log-probs: the same weights that generated (sync after every update). With one update per
        # batch they equal the detached log-probs of the training forward (rho = 1), so no extra forward.
        everything = list(range(n))
        old = ref = None
        gap = None
        if not on_policy:
            old = self.workers.logprobs(micro_batches(everything))
            gap = engine_gaps(old, samples, num_engines)
        if self.needs_ref:
            ref = self.workers.logprobs(micro_batches(everything), reference=True)

        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        grad_norms = []
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + self.step)
        for _epoch in range(cfg.ppo_epochs):
            for mb in self._minibatches(len(groups), generator):
                # Groups of similar length together to cut padding (the loss uses global counts, so the order
                # does not change it).
                mb = sorted(mb, key=lambda i: (group_length[i // G], i // G, i))
                m = self.workers.update(micro_batches(mb, old, ref, engine=on_policy, update=True),
                                        cfg.policy_loss_kwargs())
                grad_norms.append(m.pop("grad_norm"))
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v * len(mb)
                    weights[k] = weights.get(k, 0.0) + len(mb)
        out = {k: v / weights[k] for k, v in sums.items()}
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        if gap is not None:
            # Mean |trainer - engine| log-prob over the sampled tokens, before any update of this step.
            out.update(gap)
        return out

    def _minibatches(self, num_groups: int, generator: torch.Generator) -> list[list[int]]:
        """Sequence indices of each mini-batch of one epoch: shuffled sequences, or with ``shared_prompt`` packing
        shuffled whole groups (a packed row shares a group's prompt, so a group must not be split)."""
        cfg, G = self.cfg, self.cfg.group_size
        n = num_groups * G
        if self.packing != "shared_prompt":
            return [mb.tolist() for mb in minibatches(n, cfg.mini_batch_size or n, generator)]
        per_minibatch = (cfg.mini_batch_size or n) // G
        return [[g * G + j for g in mb.tolist() for j in range(G)]
                for mb in minibatches(num_groups, per_minibatch, generator)]

    def _micro_batch_chunks(self, indices: list[int], samples: list[Sample]) -> list[list[int]]:
        """``indices`` cut into micro-batches, in the order given: ``micro_batch_size`` sequences (with
        ``shared_prompt`` packing rounded up to whole groups), or with packing and ``micro_batch_tokens`` as many
        units (groups, or sequences for ``padding_free``) as that many packed positions hold (a longer one alone)."""
        from rl.common.packing import packed_length

        cfg = self.cfg
        if self.packing == "off":
            return [indices[k : k + cfg.micro_batch_size] for k in range(0, len(indices), cfg.micro_batch_size)]
        share = self.packing == "shared_prompt"
        size = cfg.group_size if share else 1
        units = [indices[k : k + size] for k in range(0, len(indices), size)]
        if cfg.micro_batch_tokens is None:
            per_micro = -(-cfg.micro_batch_size // size)
            return [sum(units[k : k + per_micro], []) for k in range(0, len(units), per_micro)]
        chunks: list[list[int]] = []
        used = 0
        for unit in units:
            length = packed_length([samples[i].prompt_ids for i in unit], [samples[i].completion_ids for i in unit],
                                   share)
            if chunks and used + length <= cfg.micro_batch_tokens:
                chunks[-1] += unit
                used += length
            else:
                chunks.append(list(unit))
                used = length
        return chunks

    # ------------------------------------------------------------------ metrics and logs
    def _rollout_metrics(self, groups: list[Group]) -> dict:
        G = self.cfg.group_size
        if not groups:
            return {"groups": 0}
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)
        lengths = [len(s.completion_ids) for g in groups for s in g.samples]
        correct = [sum(g.correct) for g in groups]
        metrics = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "zero_variance_share": zero_variance_groups(rewards).float().mean().item(),
            "groups": len(groups),
            "response_length_mean": sum(lengths) / len(lengths),
            "response_length_max": max(lengths),
            "truncation_rate": sum(s.truncated for g in groups for s in g.samples) / len(lengths),
        }
        for k in power_of_two_ks(G):
            metrics[f"pass@{k}"] = pass_at_k_groups(correct, G, k)
        return metrics

    def _log(self, metrics: dict) -> None:
        clean = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in metrics.items()
                 if not isinstance(v, float) or math.isfinite(v)}
        with self.out.metrics.open("a") as f:
            f.write(json.dumps({"phase": "rl", **clean}) + "\n")
        for tracker in self.trackers:
            tracker(clean)
        keys = ("reward_mean", "pass@1", f"pass@{self.cfg.group_size}", "kl", "entropy", "logprob_gap_engine_trainer",
                *sorted(k for k in clean if k.startswith("logprob_gap/")), "time/sync")
        print(f"[rl] step {self.step}/{self.cfg.steps} " + " ".join(f"{k}={clean[k]:.4g}" for k in keys if k in clean),
              flush=True)

    def _save_rollouts(self, groups: list[Group]) -> None:
        path = self.out.rollout_file(self.step + 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for g in groups:
                for s, r in zip(g.samples, g.rewards):
                    f.write(json.dumps({"problem": g.row.get("problem"), "answer": g.row["answer"],
                                        "completion": s.text, "reward": r, "truncated": s.truncated,
                                        "engine": s.engine}) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> Path | None:
        return latest_complete_checkpoint(self.out.checkpoints, self.out.step_prefix, last_file="trainer_state.pt")

    def save_checkpoint(self) -> Path:
        """A consolidated HF directory (what evaluations and the next stage read), the worker group's sharded
        weights and optimizer beside it, and the controller's state (step, data position, RNG) last."""
        target = self.out.step_checkpoint(self.step)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.workers.save_hf(tmp)
        self.workers.save_checkpoint(tmp / DCP_DIR)
        torch.save({
            "step": self.step,
            "cursor": self.stream.cursor,
            "workers": self.cfg.workers,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }, tmp / "trainer_state.pt")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)  # a checkpoint directory exists only when complete
        return target

    def _load_state(self, ckpt: Path) -> None:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        self.step = state["step"]
        self.stream.cursor = state["cursor"]
        self.workers.load_checkpoint(ckpt / DCP_DIR)
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])


def _default_reward(cfg: GRPOConfig) -> Callable:
    from rl.reward import math_reward

    return functools.partial(math_reward, timeout_s=cfg.reward_timeout_s, format_weight=cfg.format_weight,
                             fallback=cfg.answer_fallback)


def _ray_options(cfg: GRPOConfig, device: str) -> dict:
    """Resources of each Ray worker (``rl.workers`` > 1): `rl.workers.worker_resources`. The controller and its
    in-process engine wait while the workers train and the workers wait while the engine generates, so by
    default the workers share the stage's own CPUs."""
    from rl.workers import worker_resources

    return worker_resources(cfg.workers, cfg.worker_cpus, cfg.worker_timeout_s, device)


def engine_gaps(trainer_logprobs: list[list[float]], samples: list[Sample], num_engines: int = 1) -> dict[str, float]:
    """Mean |trainer - engine| log-prob over every sampled token (``logprob_gap_engine_trainer``) and, with several
    engines, over each engine's samples (``logprob_gap/engine<e>``): the names `rl.workers.TrainerWorker.update`
    reports on policy."""
    total, count = [0.0] * num_engines, [0] * num_engines
    for lp, s in zip(trainer_logprobs, samples):
        total[s.engine] += sum(abs(a - b) for a, b in zip(lp, s.logprobs))
        count[s.engine] += len(lp)
    out = {"logprob_gap_engine_trainer": sum(total) / max(sum(count), 1)}
    if num_engines > 1:
        out.update({f"logprob_gap/engine{e}": t / max(c, 1) for e, (t, c) in enumerate(zip(total, count))})
    return out
