"""The GRPO loop. It reads like the algorithm; engines, rewards and the maths live elsewhere.

    for step in steps:
        groups  = generate G completions per prompt           (rollout engine, vLLM by default)
        rewards = math_reward(completions, answers)           (math-verify in a deadline-bounded pool)
        adv     = group_advantages(rewards)                    (dynamic sampling refills zero-variance groups)
        for epoch, mini-batch: policy_loss(...).backward(); optimizer.step()
        engine.update_weights(policy)                          (the engine serves the new weights)
        checkpoint every N steps: weights, optimizer, data position, RNG -> exact resume

Outputs (``rl.grpo.outputs.GRPOOutputs``, placed by the caller)::

    metrics                    one line per step
    rollouts/<step N>.jsonl    prompts, completions, rewards
    checkpoints/<step N>/      HF model dir + trainer_state.pt (optimizer, cursor, RNG) [+ adapter/ with LoRA]
    final                      the final model (HF dir)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rl.grpo.config import GRPOConfig
from rl.grpo.core import fill_groups, group_advantages, mask_truncated, minibatches, policy_loss, zero_variance_groups
from rl.grpo.logprobs import completion_logprobs
from rl.grpo.outputs import GRPOOutputs
from rl.common.lora import ADAPTER_DIR, adapters_disabled, merged_state_dict, wrap_with_lora
from rl.metrics import pass_at_k_groups, power_of_two_ks
from rl.common.precision import resolve_bf16, slow_bf16_warning, stage_device
from rl.common.resume import latest_complete_checkpoint, truncate_metrics
from rl.rollout import RolloutConfig, Sample, SamplingConfig, engine_from_config, prompt_token_ids


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
    def __init__(self, *, model_dir: str, rows: list[dict], config: GRPOConfig, outputs: GRPOOutputs,
                 rollout: RolloutConfig | None = None, reference_dir: str | None = None,
                 trust_remote_code: bool = False, kl_metric: bool = True,
                 trackers: list | None = None, chat_template_kwargs: dict | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not rows:
            raise ValueError("GRPO needs at least one {prompt, answer} row")
        self.cfg, self.rows = config, rows
        self.rollout_cfg = rollout or RolloutConfig()
        self.out = outputs
        self.out.metrics.parent.mkdir(parents=True, exist_ok=True)
        self.trust_remote_code = trust_remote_code
        self.trackers = trackers or []
        self.step, self.stream = 0, PromptStream(len(rows), config.seed)

        resume_dir = self.latest_checkpoint()
        start_dir = str(resume_dir) if resume_dir else model_dir
        self.device = stage_device()
        self.precision = resolve_bf16(config.bf16, self.device)
        self.autocast_dtype = torch.bfloat16 if self.precision.bf16 else None
        print(f"[rl] trainer compute: {self.precision.describe()}", flush=True)
        if warning := slow_bf16_warning(self.precision, "rl.bf16"):
            print(f"[rl] WARNING: {warning}", flush=True)
        self.tokenizer = AutoTokenizer.from_pretrained(start_dir, trust_remote_code=trust_remote_code)
        self.lora = config.lora.enabled
        if self.lora:
            # The base is always the starting model; a resumed run reloads its adapters.
            base = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=getattr(torch, config.lora.base_dtype), trust_remote_code=trust_remote_code)
            self.model = wrap_with_lora(base, config.lora, resume_dir / ADAPTER_DIR if resume_dir else None)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                start_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
        self.model.to(self.device).train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=config.learning_rate, betas=tuple(config.adam_betas),
                                           weight_decay=config.weight_decay)
        self.needs_ref = config.beta_kl > 0 or kl_metric
        other_reference = reference_dir is not None and Path(reference_dir).resolve() != Path(model_dir).resolve()
        self.reference = None  # None with LoRA on the reference itself: adapters_disabled(self.model) is it
        if self.needs_ref and (not self.lora or other_reference):
            dtype = getattr(torch, config.lora.base_dtype) if self.lora else torch.float32
            self.reference = AutoModelForCausalLM.from_pretrained(
                reference_dir or model_dir, dtype=dtype, trust_remote_code=trust_remote_code
            ).to(self.device).eval().requires_grad_(False)
        if resume_dir:
            self._load_state(resume_dir)
            print(f"[rl] resumed from {resume_dir} (step {self.step})", flush=True)
        truncate_metrics(self.out.metrics, self.step)  # steps after the checkpoint are logged again
        self.prompt_ids = prompt_token_ids(self.tokenizer, [r["prompt"] for r in rows], chat_template_kwargs)
        self.engine = engine_from_config(self.rollout_cfg, start_dir, seed=config.seed,
                                         trust_remote_code=trust_remote_code)

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path:
        from tqdm.auto import tqdm

        cfg = self.cfg
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
        self._save_model(self.out.final)
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
            t = time.perf_counter()
            metrics.update(self._update(groups))
            timings["train"] = time.perf_counter() - t
            t = time.perf_counter()
            self.engine.update_weights(self._hf_weights())
            timings["sync"] = time.perf_counter() - t
        n_tokens = sum(len(s.completion_ids) for g in groups for s in g.samples)
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        metrics["tokens_per_s"] = n_tokens / max(timings["generate"], 1e-9)
        return metrics

    def _rollout(self, picks: list[tuple[int, int]], timings: dict) -> list[Group]:
        from rl.reward import math_reward

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
        results = math_reward(texts, answers, timeout_s=cfg.reward_timeout_s, format_weight=cfg.format_weight,
                              fallback=cfg.answer_fallback)
        timings["reward"] += time.perf_counter() - t
        groups = []
        for j, ((_, r), samples) in enumerate(zip(picks, outputs)):
            res = results[j * cfg.group_size : (j + 1) * cfg.group_size]
            groups.append(Group(self.rows[r], self.prompt_ids[r], samples, [x.score for x in res], [x.correct for x in res]))
        return groups

    def _update(self, groups: list[Group]) -> dict:
        """Several mini-batch updates on one rollout batch; returns averaged loss metrics."""
        cfg = self.cfg
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
        advantages = group_advantages(rewards, normalize_std=cfg.normalize_std).flatten()
        samples = [s for g in groups for s in g.samples]
        G = cfg.group_size
        group_length = [len(g.prompt_ids) + max(len(s.completion_ids) for s in g.samples) for g in groups]
        truncated = torch.tensor([s.truncated for s in samples])
        n = len(samples)
        on_policy = cfg.ppo_epochs == 1 and (cfg.mini_batch_size is None or cfg.mini_batch_size >= n)

        # old log-probs: the same weights that generated (sync after every update). With one update per
        # batch they equal the detached log-probs of the training forward (rho = 1), so no extra forward.
        old_logp, ref_logp, gap = [None] * n, [None] * n, []
        micro = cfg.micro_batch_size
        with torch.no_grad():
            for start in range(0, n, micro):
                chunk = samples[start : start + micro]
                if not on_policy:
                    lp, _, m = completion_logprobs(self.model, chunk, cfg.temperature, with_entropy=False,
                                                   autocast_dtype=self.autocast_dtype)
                    gap.append(_engine_gap(lp, m, chunk))
                    for i in range(len(chunk)):
                        old_logp[start + i] = lp[i][m[i]]
                if self.needs_ref:
                    with self._reference() as reference:
                        lp, _, m = completion_logprobs(reference, chunk, cfg.temperature, with_entropy=False,
                                                       autocast_dtype=self.autocast_dtype)
                    for i in range(len(chunk)):
                        ref_logp[start + i] = lp[i][m[i]]

        sums: dict[str, float] = {}
        count = 0
        grad_norms = []
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + self.step)
        for _epoch in range(cfg.ppo_epochs):
            for mb in minibatches(n, cfg.mini_batch_size or n, generator):
                # Micro-batches of whole groups (completion_logprobs computes a prompt once per micro-batch,
                # not once per sample), groups of similar length together to cut padding (the loss uses
                # global counts, so the order does not change it).
                mb = sorted(mb.tolist(), key=lambda i: (group_length[i // G], i // G, i))
                trained = [i for i in mb if samples[i].completion_ids and not (cfg.mask_truncated and samples[i].truncated)]
                n_tokens = sum(len(samples[i].completion_ids) for i in trained)
                self.optimizer.zero_grad(set_to_none=True)
                for start in range(0, len(mb), micro):
                    idx = mb[start : start + micro]
                    chunk = [samples[i] for i in idx]
                    logp, entropy, mask = completion_logprobs(self.model, chunk, cfg.temperature,
                                                              with_entropy=True, autocast_dtype=self.autocast_dtype)
                    if cfg.mask_truncated:
                        mask = mask_truncated(mask, truncated[idx].to(mask.device))
                    if on_policy:
                        gap.append(_engine_gap(logp.detach(), mask, chunk))
                    old = logp.detach() if on_policy else _dense([old_logp[i] for i in idx], logp)
                    ref = None if ref_logp[idx[0]] is None else _dense([ref_logp[i] for i in idx], logp)
                    loss, m = policy_loss(
                        logp, old, advantages[idx].to(logp.device), mask,
                        ref_logp=ref, entropy=entropy,  # with beta_kl 0 the reference only feeds the "kl" metric
                        num_tokens=max(n_tokens, 1), num_seqs=max(len(trained), 1), **cfg.policy_loss_kwargs(),
                    )
                    loss.backward()
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
                    count += len(chunk)
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)))
                self.optimizer.step()
        out = {k: v / max(count, 1) for k, v in sums.items()}
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        # Mean |trainer - engine| log-prob over the sampled tokens, before any update of this step.
        out["logprob_gap_engine_trainer"] = sum(t for t, _ in gap) / max(sum(c for _, c in gap), 1)
        return out

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
        keys = ("reward_mean", "pass@1", f"pass@{self.cfg.group_size}", "kl", "entropy", "logprob_gap_engine_trainer")
        print(f"[rl] step {self.step}/{self.cfg.steps} " + " ".join(f"{k}={clean[k]:.4g}" for k in keys if k in clean),
              flush=True)

    def _save_rollouts(self, groups: list[Group]) -> None:
        path = self.out.rollout_file(self.step + 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for g in groups:
                for s, r in zip(g.samples, g.rewards):
                    f.write(json.dumps({"problem": g.row.get("problem"), "answer": g.row["answer"],
                                        "completion": s.text, "reward": r, "truncated": s.truncated}) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> Path | None:
        return latest_complete_checkpoint(self.out.checkpoints, self.out.step_prefix, last_file="trainer_state.pt")

    def save_checkpoint(self) -> Path:
        target = self.out.step_checkpoint(self.step)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self._save_model(tmp)
        torch.save({
            "step": self.step,
            "cursor": self.stream.cursor,
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }, tmp / "trainer_state.pt")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)  # a checkpoint directory exists only when complete
        return target

    def _load_state(self, ckpt: Path) -> None:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        self.step = state["step"]
        self.stream.cursor = state["cursor"]
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])

    def _save_model(self, path: Path) -> None:
        """An HF model directory (LoRA: the merged weights, plus the adapters for resuming)."""
        if self.lora:
            self.model.get_base_model().save_pretrained(path, state_dict=self._hf_weights(), safe_serialization=True)
            self.model.save_pretrained(path / ADAPTER_DIR)
        else:
            self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)

    def _hf_weights(self) -> dict[str, torch.Tensor]:
        """What the engine serves and checkpoints hold: plain HF parameter names and values."""
        return merged_state_dict(self.model) if self.lora else self.model.state_dict()

    @contextlib.contextmanager
    def _reference(self):
        if self.reference is None:  # LoRA whose base is the reference
            with adapters_disabled(self.model) as base:
                yield base
        else:
            yield self.reference


def _engine_gap(logp: torch.Tensor, mask: torch.Tensor, chunk: list[Sample]) -> tuple[float, int]:
    """(sum of |trainer - engine| log-prob over valid tokens, number of tokens) for one micro-batch."""
    engine = _dense([torch.tensor(s.logprobs) for s in chunk], logp)
    return float(((logp - engine).abs() * mask).sum()), int(mask.sum())


def _dense(rows: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Right-pad 1-D tensors into the [b, T] layout of ``like``."""
    out = torch.zeros_like(like)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r.to(out.dtype).to(out.device)
    return out
