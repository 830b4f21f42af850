"""The cold start in this process: ``run_sft(recipe, objective, out)`` trains and writes an HF checkpoint directory.

What it writes (an ``eksft.layout.SFTStageDir``; resumable):
    checkpoint        the final model + tokenizer (LoRA merged), loads in transformers and vLLM
    checkpoints       Trainer checkpoints (optimizer, scheduler, RNG) for resuming a killed run
    metrics           one line per logged optimizer step
    batch             the global batch: processes x batch_size x grad_accum (also printed at the start)
    masks             the page of the tokens the objective removes, on the first SFT examples, after training
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from eksft.layout import SFTStageDir

MASKS_PAGE_EXAMPLES = 5  # examples on the stage's masks.html


def is_main_process() -> bool:
    """True outside torchrun, and in its process of global rank 0 (the one that writes and prints)."""
    return int(os.environ.get("RANK", "0")) == 0


def run_sft(recipe, objective, out: SFTStageDir, *, callbacks=()) -> Path:
    """Train ``objective`` (an arm's ``ObjectiveConfig``) with the recipe's ``sft`` settings, writing to ``out``;
    returns the final checkpoint directory. Resumes from ``out.checkpoints``."""
    from transformers import TrainingArguments
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from rl.common.lora import wrap_with_lora
    from rl.common.precision import low_precision_warning, resolve_bf16, slow_bf16_warning, stage_device
    from rl.common.resume import latest_complete_checkpoint, truncate_metrics

    from eksft.data import build_sft_dataset
    from eksft.inspect_masks import write_masks_page
    from eksft.models import load_model
    from eksft.objectives import get_objective
    from eksft.sft.trainer import MetricsJsonlCallback, ReferenceModel, SelectiveSFTTrainer, pad_collate

    cfg = recipe.sft
    out.root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    model, tokenizer = load_model(recipe.model.name, recipe.model.dtype, recipe.model.trust_remote_code, recipe.model.revision)
    examples, stats = build_sft_dataset(recipe, tokenizer)
    # Under torchrun every process runs this function; only the first one writes files and prints.
    main_process = is_main_process()
    if main_process:
        print(f"[sft] {recipe.data.sft.source}: {stats.summary()}", flush=True)
        out.data_stats.write_text(
            json.dumps({k: v for k, v in vars(stats).items() if k != "truncated_rows"}))

    needs_reference = get_objective(objective.name).needs_reference or cfg.kl_metric_every > 0
    reference = None
    if cfg.lora.enabled:
        model = wrap_with_lora(model, cfg.lora)
    if main_process and (warning := low_precision_warning(model, cfg.learning_rate)):
        print(f"[sft] WARNING: {warning}", flush=True)
    precision = resolve_bf16(cfg.bf16, stage_device())
    if main_process:
        print(f"[sft] compute: {precision.describe()}", flush=True)
        if warning := slow_bf16_warning(precision, "sft.bf16"):
            print(f"[sft] WARNING: {warning}", flush=True)
    if needs_reference:
        if cfg.reference == "adapter":
            reference = ReferenceModel("adapter")
        else:
            frozen, _ = load_model(recipe.model.name, recipe.model.dtype, recipe.model.trust_remote_code, recipe.model.revision)
            reference = ReferenceModel("copy", frozen)

    args = TrainingArguments(
        output_dir=str(out.checkpoints),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        adam_beta1=cfg.adam_betas[0],
        adam_beta2=cfg.adam_betas[1],
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=precision.bf16,
        use_cpu=not torch.cuda.is_available(),  # CPU bf16 autocast needs this flag
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=list(recipe.report_to) or "none",
        seed=recipe.seed,
        data_seed=recipe.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=False,
        ddp_find_unused_parameters=False,  # every trainable parameter takes part in the forward
    )
    devices = args.world_size  # the processes that really run (a torchrun the user started may differ)
    if cfg.global_batch is not None and cfg.global_batch != cfg.sequences_per_step(devices):
        raise RuntimeError(f"the recipe states sft.global_batch {cfg.global_batch}, but this run has "
                           f"{cfg.describe_global_batch(devices)}")
    if main_process:
        print(f"[sft] {cfg.describe_global_batch(devices)}", flush=True)
        out.batch.write_text(json.dumps({"devices": devices, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                                         "global_batch": cfg.sequences_per_step(devices)}))
    trainer = SelectiveSFTTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=pad_collate(tokenizer.pad_token_id),
        objective=objective,
        reference=reference,
        kl_metric_every=0 if get_objective(objective.name).needs_reference else cfg.kl_metric_every,
        callbacks=[MetricsJsonlCallback(out.metrics), *callbacks],
    )
    # The Trainer writes trainer_state.json last: a checkpoint without it was cut short by a kill.
    last = latest_complete_checkpoint(args.output_dir, PREFIX_CHECKPOINT_DIR, last_file=TRAINER_STATE_NAME)
    resumed_step = json.loads((last / TRAINER_STATE_NAME).read_text())["global_step"] if last else 0
    if main_process:
        truncate_metrics(out.metrics, resumed_step)  # the steps after it are logged again
        if last:
            print(f"[sft] resuming from {last} (step {resumed_step})", flush=True)
    trainer.train(resume_from_checkpoint=str(last) if last else None)

    final = out.checkpoint
    if main_process:
        trained = trainer.model
        # The token-mask page (the report links to it) from the models in memory, before LoRA is merged away.
        page_reference = (reference or trained) if cfg.lora.enabled else reference  # trained: its adapters-off base
        if page_reference is None:  # sft/dft without a KL metric loaded none: the page needs the starting model
            page_reference = load_model(recipe.model.name, recipe.model.dtype, recipe.model.trust_remote_code, recipe.model.revision)[0]
        write_masks_page(trained, page_reference, tokenizer, examples, objective, out.masks, n=MASKS_PAGE_EXAMPLES,
                         title=f"EKSFT token masks: {final} on {recipe.data.sft.source}")
        if cfg.lora.enabled:
            trained = trained.merge_and_unload()  # a plain model directory that vLLM serves directly
        trained.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
    trainer.accelerator.wait_for_everyone()  # every process returns a directory that exists
    return final
