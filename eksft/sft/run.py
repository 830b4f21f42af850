"""The cold start: ``run_sft(recipe, objective, out)`` trains on the trainer worker group and writes an HF checkpoint.

The loop, as it runs:

    plan = StepPlan(...)                      which examples each optimizer step trains on (eksft.sft.plan)
    workers = make_worker_group(...)          sft.workers FSDP2 ranks: policy, reference, AdamW (rl.workers)
    for step in range(resumed_step, plan.total_steps):
        micro_batches = examples of plan.micro_batches(step)
        metrics = workers.train_step(micro_batches, objective_loss, learning_rate_at(step))
        log every sft.logging_steps; checkpoint every sft.save_steps (and at the end)
    workers.save_hf(out.checkpoint)           the final model (LoRA merged), for vLLM and evaluations

The objective is the registered pure function (`eksft.objectives`), run on each rank by `ObjectiveStepLoss`
(`eksft.sft.step`), with the reference forward where the objective needs it or a KL-metric step asks for it.

What it writes (an ``eksft.layout.SFTStageDir``; resumable):
    checkpoint        the final model + tokenizer (LoRA merged, adapters in ``adapter/``): transformers and vLLM load it
    checkpoints       checkpoint-N/: dcp/ (sharded policy + AdamW), rng/ (each rank's RNG), trainer_state.json (last)
    metrics           one line per logged optimizer step (loss, learning_rate, grad_norm, epoch, objective metrics)
    batch             the global batch: workers x batch_size x grad_accum (also printed at the start)
    masks             the page of the tokens the objective removes, on the first SFT examples, after training
    tb                TensorBoard events (report_to: [tensorboard])
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

from eksft.layout import SFTStageDir

MASKS_PAGE_EXAMPLES = 5  # examples on the stage's masks.html
CHECKPOINT_PREFIX = "checkpoint"  # checkpoint-N, as the HF Trainer named them
STATE_FILE = "trainer_state.json"  # written last: a checkpoint without it was cut short by a kill
DCP_DIR, RNG_DIR = "dcp", "rng"


def run_sft(recipe, objective, out: SFTStageDir, *, on_step: Callable[[int, dict], None] | None = None) -> Path:
    """Train ``objective`` (an arm's ``ObjectiveConfig``) with the recipe's ``sft`` settings, writing to ``out``;
    returns the final checkpoint directory. Resumes from the last complete checkpoint in ``out.checkpoints``.
    ``on_step(step, metrics)`` is called after every optimizer step (1-based step)."""
    from tqdm.auto import tqdm

    from eksft.data import build_sft_dataset
    from eksft.models import load_tokenizer, resolve_model_dir
    from eksft.objectives import get_objective
    from eksft.sft.plan import StepPlan, learning_rate_at, warmup_steps
    from eksft.sft.step import ObjectiveStepLoss, SFTMicroBatch
    from eksft.tracking import make_trackers
    from rl.common.packing import sft_packed
    from rl.common.precision import resolve_bf16, slow_bf16_warning
    from rl.common.resume import latest_complete_checkpoint, truncate_metrics
    from rl.workers import make_worker_group, worker_resources, workers_device

    cfg = recipe.sft
    out.root.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(recipe.model.name, recipe.model.revision)
    tokenizer = load_tokenizer(model_dir, recipe.model.trust_remote_code)
    examples, stats = build_sft_dataset(recipe, tokenizer)
    print(f"[sft] {recipe.data.sft.source}: {stats.summary()}", flush=True)
    out.data_stats.write_text(json.dumps({k: v for k, v in vars(stats).items() if k != "truncated_rows"}))

    plan = StepPlan(len(examples), cfg.batch_size, cfg.grad_accum, cfg.workers, recipe.seed, cfg.epochs, cfg.max_steps)
    total, warmup = plan.total_steps, warmup_steps(cfg.warmup_ratio, plan.total_steps)
    print(f"[sft] {cfg.describe_global_batch()}; {total} steps ({plan.steps_per_epoch} per epoch)", flush=True)
    out.batch.write_text(json.dumps({"workers": cfg.workers, "batch_size": cfg.batch_size,
                                     "grad_accum": cfg.grad_accum, "global_batch": cfg.sequences_per_step()}))
    device = workers_device(cfg.workers)
    precision = resolve_bf16(cfg.bf16, device)
    packed = sft_packed(cfg.packing, device)
    print(f"[sft] compute: {precision.describe()}, {cfg.workers} worker(s), packing {'on' if packed else 'off'}",
          flush=True)
    if warning := slow_bf16_warning(precision, "sft.bf16"):
        print(f"[sft] WARNING: {warning}", flush=True)
    if recipe.model.dtype != "float32" and not cfg.lora.enabled:
        print(f"[sft] WARNING: model.dtype {recipe.model.dtype}: the trained weights and AdamW state are "
              f"{recipe.model.dtype}, with no float32 master copy (updates of size lr={cfg.learning_rate:g} mostly "
              "round away); model.dtype: float32 with sft.bf16 computes in bf16 on float32 weights", flush=True)

    needs_reference = get_objective(objective.name).needs_reference
    wants_reference = needs_reference or cfg.kl_metric_every > 0
    settings = worker_settings(recipe, model_dir, wants_reference)
    # Two losses, built once: the reference forward runs on every step, or (sft, dft) on KL-metric steps only.
    losses = {with_ref: ObjectiveStepLoss(objective, tokenizer.pad_token_id, with_ref, packed=packed)
              for with_ref in {needs_reference, wants_reference}}

    def loss_of(step: int) -> ObjectiveStepLoss:  # ``step``: optimizer steps done before this one
        return losses[needs_reference or (cfg.kl_metric_every > 0 and step % cfg.kl_metric_every == 0)]

    last = latest_complete_checkpoint(out.checkpoints, CHECKPOINT_PREFIX, last_file=STATE_FILE)
    if last is not None and not (last / DCP_DIR).is_dir():  # refused before a worker starts
        raise ValueError(f"{last} is a checkpoint of the HF-Trainer cold start (before sft.workers): it cannot be "
                         "resumed; delete the stage's checkpoints directory and start the stage again")
    workers = make_worker_group(settings, cfg.workers,
                                **worker_resources(cfg.workers, cfg.worker_cpus, cfg.worker_timeout_s, device))
    try:
        step = 0
        if last is not None:
            workers.load_checkpoint(last / DCP_DIR)
            workers.load_rng_state(last / RNG_DIR)
            step = json.loads((last / STATE_FILE).read_text())["step"]
            print(f"[sft] resumed from {last} (step {step})", flush=True)
        else:
            workers.seed(recipe.seed)
        truncate_metrics(out.metrics, step)  # the steps after the checkpoint are logged again
        trackers = make_trackers(recipe.report_to, out.tensorboard, f"{recipe.name}-{objective.name}-sft",
                                 recipe.model_dump(mode="json"))
        log = MetricsLog(out.metrics, trackers)
        with tqdm(total=total, initial=step, desc="sft", unit="step", dynamic_ncols=True) as bar:
            while step < total:
                micro_batches = [SFTMicroBatch.of([examples[i] for i in indices]) for indices in plan.micro_batches(step)]
                lr = learning_rate_at(step, base=cfg.learning_rate, schedule=cfg.lr_scheduler, warmup=warmup, total=total)
                metrics = workers.train_step(micro_batches, loss_of(step), learning_rate=lr)
                step += 1
                log.add(metrics)
                if step % cfg.logging_steps == 0 or step == total:
                    bar.set_postfix(log.write(step, plan.epoch_after(step - 1)))
                if step % cfg.save_steps == 0 or step == total:
                    save_checkpoint(workers, out.checkpoints, step, cfg.save_total_limit)
                if on_step is not None:
                    on_step(step, metrics)
                bar.update(1)
        workers.save_hf(out.checkpoint)
    finally:
        workers.shutdown()
    tokenizer.save_pretrained(out.checkpoint)  # the tokenizer the data was built with (a pad token set)
    write_masks(recipe, objective, out, examples, tokenizer)
    return out.checkpoint


def worker_settings(recipe, model_dir: str, with_reference: bool):
    """What every trainer worker of the cold start builds: the policy from ``model_dir`` (float32 masters unless
    model.dtype says otherwise; LoRA adapters when sft.lora is on), the sft optimizer settings, and the reference:
    a sharded frozen copy (reference: copy) or the LoRA base with adapters off (reference: adapter, no copy)."""
    from rl.workers import WorkerSettings

    cfg = recipe.sft
    return WorkerSettings(
        model_dir=model_dir, reference_dir=model_dir if with_reference and cfg.reference == "copy" else None,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, adam_betas=tuple(cfg.adam_betas),
        max_grad_norm=cfg.max_grad_norm, bf16=cfg.bf16, activation_checkpointing=cfg.gradient_checkpointing,
        trust_remote_code=recipe.model.trust_remote_code, lora=cfg.lora if cfg.lora.enabled else None,
        seed=recipe.seed, dtype=recipe.model.dtype)


class MetricsLog:
    """Per logged step, as the HF Trainer logged: ``loss`` (the mean of the steps since the last log),
    ``grad_norm`` and ``learning_rate`` of the last step, ``epoch``, and the objective's metrics averaged over the
    steps since the last log; appended to metrics.jsonl and given to the trackers."""

    LAST_VALUE = ("grad_norm", "learning_rate")

    def __init__(self, path: Path, trackers=()):
        self.path, self.trackers = Path(path), list(trackers)
        self.pending: list[dict] = []

    def add(self, metrics: dict) -> None:
        self.pending.append(metrics)

    def write(self, step: int, epoch: float) -> dict:
        names = sorted({k for m in self.pending for k in m})
        record = {"phase": "sft", "step": step, "epoch": epoch}
        for name in names:
            if name in self.LAST_VALUE:
                record[name] = self.pending[-1][name]
            else:
                values = [m[name] for m in self.pending if name in m]
                record[name] = sum(values) / len(values)
        record = {k: v for k, v in record.items() if not isinstance(v, float) or math.isfinite(v)}
        self.pending = []
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker(record)
        return {"loss": f"{record.get('loss', float('nan')):.4f}", "lr": f"{record.get('learning_rate', 0):.2e}"}


def save_checkpoint(workers, directory: Path, step: int, keep: int | None) -> Path:
    """checkpoint-<step>/ with the sharded state, each rank's RNG, then the loop's state (last: the marker of a
    finished save); older checkpoints beyond ``keep`` are deleted."""
    from rl.common.resume import checkpoint_name, complete_checkpoints

    path = Path(directory) / checkpoint_name(CHECKPOINT_PREFIX, step)
    if path.exists():  # a save the kill cut short (no state file): written again from scratch
        shutil.rmtree(path)
    workers.save_checkpoint(path / DCP_DIR)
    workers.save_rng_state(path / RNG_DIR)
    (path / STATE_FILE).write_text(json.dumps({"step": step}))
    if keep is not None:
        for _, old in complete_checkpoints(directory, CHECKPOINT_PREFIX, STATE_FILE)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def write_masks(recipe, objective, out: SFTStageDir, examples: list[dict], tokenizer) -> None:
    """The token-mask page (the report links to it): the trained model against the starting model, which is the
    reference of either mode (a frozen copy, or the LoRA base with adapters off: the same weights)."""
    from eksft.inspect_masks import write_masks_page
    from eksft.models import load_model

    model = recipe.model
    trained, _ = load_model(str(out.checkpoint), model.dtype, model.trust_remote_code)
    start, _ = load_model(model.name, model.dtype, model.trust_remote_code, model.revision)
    write_masks_page(trained, start, tokenizer, examples, objective, out.masks, n=MASKS_PAGE_EXAMPLES,
                     title=f"EKSFT token masks: {out.checkpoint} on {recipe.data.sft.source}")
