"""The SFT stage on real (tiny) models: accumulation invariance, LoRA + adapter reference, exact resume, CLI."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from eksft.cli import main
from eksft.config import load_recipe
from eksft.layout import SFTStageDir
from eksft.inspect_masks import run_inspect
from eksft.sft import run_sft

BASE = ["model.name=tiny:qwen2", "data.sft.num_examples=8", "data.max_length=128", "sft.learning_rate=1e-2",
        "sft.warmup_ratio=0", "sft.lr_scheduler=constant", "sft.save_steps=1000", "sft.kl_metric_every=0",
        "sft.bf16=false"]  # numbers compared across runs: float32 on every CPU


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def read_metrics(stage: Path) -> list[dict]:
    return [json.loads(line) for line in SFTStageDir(stage).metrics.read_text().splitlines()]


def train(overrides: list[str], out: Path, arm: str = "eksft", callbacks=()) -> Path:
    """run_sft on the objective of one of the default arms (sft, eksft), as the SFT stage of that arm."""
    recipe = load_recipe(None, overrides)
    return run_sft(recipe, recipe.arm(arm).objective, SFTStageDir(out), callbacks=callbacks)


class GradientsBeforeStep(TrainerCallback):
    """The accumulated gradient of every optimizer step, as the optimizer is about to see it."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append(torch.cat([p.grad.detach().flatten().clone() for p in model.parameters() if p.grad is not None]))


@pytest.mark.parametrize("objective", ["eksft", "sft"])
def test_two_accumulation_steps_of_one_equal_one_batch_of_two(tmp_path, objective):
    common = [*BASE, "sft.max_steps=1", "arms.eksft.objective.ratio=0.3"]
    g_b2, g_a2 = GradientsBeforeStep(), GradientsBeforeStep()
    batch2 = train([*common, "sft.batch_size=2", "sft.grad_accum=1"], tmp_path / "b2", objective, callbacks=[g_b2])
    accum2 = train([*common, "sft.batch_size=1", "sft.grad_accum=2"], tmp_path / "a2", objective, callbacks=[g_a2])
    start = weights(Path(os.environ.get("EKSFT_CACHE", Path.home() / ".cache/eksft")) / "models/tiny-qwen2")
    w_b2, w_a2 = weights(batch2), weights(accum2)
    moved = max((w_b2[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-4  # the step did something
    # The update itself: the gradient the optimizer receives. (Not the weights after AdamW: its first step,
    # lr * g / (|g| + eps), is ~lr * sign(g), so float32 noise on a near-zero gradient component, here from
    # LM-head matmuls of different shapes, can move that weight by up to lr either way.)
    assert len(g_b2.steps) == len(g_a2.steps) == 1
    torch.testing.assert_close(g_a2.steps[0], g_b2.steps[0], rtol=1e-4, atol=1e-7)
    differ = sum(int(((w_a2[k] - w_b2[k]).abs() > 1e-6 + 1e-5 * w_b2[k].abs()).sum()) for k in w_b2)
    assert differ / sum(w.numel() for w in w_b2.values()) < 1e-3  # weights agree except where the gradient is ~0
    m_b2, m_a2 = read_metrics(tmp_path / "b2")[0], read_metrics(tmp_path / "a2")[0]
    assert m_b2["loss"] == pytest.approx(m_a2["loss"], rel=1e-5)
    assert m_b2["grad_norm"] == pytest.approx(m_a2["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("objective", ["eksft", "sft", "dft"])
def test_shared_prefix_and_lm_head_on_labelled_positions_are_exact(objective, monkeypatch):
    """The common prefix (system prompt) is computed once and the head runs from the first labelled position on:
    loss, gradients and metrics equal one plain full-logits forward per batch, on prompts of different lengths."""
    from transformers import TrainingArguments

    import eksft.sft.trainer as sft_trainer
    from eksft.models import load_model
    from eksft.objectives import get_objective
    from eksft.data import build_sft_dataset

    torch.manual_seed(0)
    recipe = load_recipe(None, ["model.name=tiny:qwen2", "data.sft.num_examples=8", "data.max_length=128"])
    model, tokenizer = load_model("tiny:qwen2")
    reference, _ = load_model("tiny:qwen2")
    with torch.no_grad():  # a reference that differs from the policy, so KL selects by value
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    examples, _ = build_sft_dataset(recipe, tokenizer)
    batch = sft_trainer.pad_collate(tokenizer.pad_token_id)(examples[:4])
    firsts = {int((row != -100).nonzero()[0]) for row in batch["labels"]}
    assert len(firsts) > 1 and min(firsts) > 10  # prompts of different lengths, a long prefix to skip
    args = TrainingArguments(output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "unused"), use_cpu=True,
                             report_to="none")
    settings = get_objective(objective).settings(**({"ratio": 0.3} if objective == "eksft" else {}))
    results = []
    for keep in (True, False):
        monkeypatch.setattr(sft_trainer, "takes_logits_to_keep", lambda m, keep=keep: keep)
        trainer = sft_trainer.SelectiveSFTTrainer(
            model=model, args=args, train_dataset=examples, objective=settings,
            reference=sft_trainer.ReferenceModel("copy", reference), kl_metric_every=1)
        seen = []  # (rows, positions) through the decoder, (rows, positions) through the LM head, per forward
        hooks = [model.model.register_forward_hook(lambda m, i, o: seen.append(("body", *o.last_hidden_state.shape[:2]))),
                 model.lm_head.register_forward_hook(lambda m, i, o: seen.append(("head", *o.shape[:2])))]
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        for hook in hooks:
            hook.remove()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((loss.detach(), grads, {k: float(v) for k, v in trainer._metric_sums.items()}, seen))
    (loss_k, grad_k, metrics_k, seen_k), (loss_f, grad_f, metrics_f, seen_f) = results
    B, T = batch["labels"].shape
    shared = sft_trainer.common_prefix_length(batch["input_ids"], batch["attention_mask"])
    assert 10 < shared < min(firsts)  # the system prompt and chat-template header
    first = min(firsts) - 1
    policy_k = [("body", 1, shared), ("head", 1, 1), ("body", B, T - shared), ("head", B, T - first)]
    assert seen_k[:4] == policy_k and seen_f[:2] == [("body", B, T), ("head", B, T)]
    torch.testing.assert_close(loss_k, loss_f, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_k, grad_f, rtol=0, atol=1e-6)
    assert metrics_k.keys() == metrics_f.keys()
    for name in metrics_k:
        assert metrics_k[name] == pytest.approx(metrics_f[name], rel=1e-5, abs=1e-6), name


@pytest.mark.slow
def test_two_torchrun_processes_equal_two_accumulation_steps(tmp_path):
    """Data parallel (2 CPU processes, gloo, batch 1 each) = one process accumulating 2 batches of 1.

    Two steps of EKSFT with its reference: the per-process losses are sequence means, DDP averages the
    gradients, so the update is the accumulated one. Only the first process writes metrics and the checkpoint;
    the objective metrics are averaged over the processes like the Trainer's loss.
    """
    common = [*BASE, "data.sft.num_examples=2", "sft.max_steps=2", "sft.batch_size=1", "sft.learning_rate=1e-3",
              "arms.eksft.objective.ratio=0.3", "sft.logging_steps=1"]
    accum = train([*common, "sft.grad_accum=2"], tmp_path / "accum")
    # `eksft sft` with sft.num_processes=2 launches torchrun itself (what the pipeline's SFT stage does too).
    cmd = [sys.executable, "-m", "eksft.cli", "sft", *[a for c in [*common, "sft.num_processes=2"] for a in ("--set", c)],
           "--arm", "eksft", "--output", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[sft] 2 processes: -m torch.distributed.run" in proc.stdout
    # The global batch, printed once and stored: 2 processes x 1 x 1 = 2 = the accumulating run's 1 x 1 x 2.
    assert proc.stdout.count("[sft] global batch = 2 processes x batch_size 1 x grad_accum 1 = 2 sequences per "
                             "optimizer step") == 1
    stored = {run: json.loads(SFTStageDir(tmp_path / run).batch.read_text()) for run in ("ddp", "accum")}
    assert stored["ddp"] == {"devices": 2, "batch_size": 1, "grad_accum": 1, "global_batch": 2}
    assert stored["accum"] == {"devices": 1, "batch_size": 1, "grad_accum": 2, "global_batch": 2}
    assert proc.stdout.count("[sft] checkpoint:") == 1 and proc.stdout.count("2 examples") == 1
    w_acc, w_ddp = weights(accum), weights(tmp_path / "ddp/checkpoint")
    for k in w_acc:
        torch.testing.assert_close(w_ddp[k], w_acc[k], rtol=1e-6, atol=1e-7)
    m_acc, m_ddp = read_metrics(tmp_path / "accum"), read_metrics(tmp_path / "ddp")
    assert [m["step"] for m in m_ddp] == [1, 2]
    assert m_ddp[1]["kl_mean"] > 0  # step 2 ran against the reference after a real update
    for a, d in zip(m_acc, m_ddp):
        for key in ("loss", "objective_loss", "ce", "entropy_mean", "kl_mean", "grad_norm"):
            assert d[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_metrics_jsonl_has_the_objective_terms(tmp_path):
    train([*BASE, "sft.max_steps=2", "sft.batch_size=2"], tmp_path / "s")
    rows = read_metrics(tmp_path / "s")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "grad_norm", "learning_rate", "ce", "entropy_bonus", "kl_term", "entropy_mean", "kl_mean",
                "removed_fraction", "iou_entropy_kl", "tokens_trained", "kl_ties"):
        assert key in rows[0], key
    assert rows[0]["kl_ties"] == 1.0 and rows[0]["kl_mean"] == 0.0  # step 0: policy == reference
    assert rows[1]["kl_mean"] > 0 and rows[1]["kl_ties"] == 0.0
    assert 0.2 <= rows[0]["removed_fraction"] <= 0.4


class StopAt(TrainerCallback):
    """Simulates a killed run: stop right after the checkpoint of step `step` is written."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_killed_run_resumes_exactly(tmp_path):
    overrides = [*BASE, "sft.max_steps=4", "sft.save_steps=2", "sft.batch_size=2", "sft.lr_scheduler=cosine",
                 "sft.learning_rate=5e-3"]
    full = train(overrides, tmp_path / "full")
    train(overrides, tmp_path / "killed", callbacks=[StopAt(3)])
    ckpts = tmp_path / "killed/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2"]
    assert [r["step"] for r in read_metrics(tmp_path / "killed")] == [1, 2, 3]
    # Where a real kill can land: inside the save of checkpoint-4 (every file but trainer_state.json,
    # which the Trainer writes last) and inside a metrics write (half a line).
    shutil.copytree(ckpts / "checkpoint-2", ckpts / "checkpoint-4", ignore=shutil.ignore_patterns("trainer_state.json"))
    with (tmp_path / "killed/metrics.jsonl").open("a") as f:
        f.write('{"phase": "sft", "step": 4, "lo')
    resumed = train(overrides, tmp_path / "killed")  # resumes from checkpoint-2
    w_full, w_res = weights(full), weights(resumed)
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], rtol=1e-6, atol=1e-7)
    assert [r["step"] for r in read_metrics(tmp_path / "killed")] == [1, 2, 3, 4]


def test_lora_with_adapter_reference(tmp_path):
    from peft import LoraConfig, get_peft_model

    from eksft.models import load_model
    from eksft.sft.trainer import ReferenceModel

    # The adapter reference is the base model exactly, whatever the adapters hold.
    base, tok = load_model("tiny:qwen2")
    ids = tok("What is 2+2?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = base(input_ids=ids).logits.clone()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        assert not torch.allclose(peft_model(input_ids=ids).logits, expected)
    ref = ReferenceModel("adapter").logits(peft_model, ids, torch.ones_like(ids), first=0)  # every position
    assert torch.equal(ref, expected)

    final = train([*BASE, "sft.max_steps=2", "sft.lora.enabled=true", "sft.reference=adapter", "sft.lora.r=4"],
                  tmp_path / "lora")
    w = weights(final)
    assert not any("lora" in k for k in w)  # merged: a plain directory vLLM serves
    rows = read_metrics(tmp_path / "lora")
    assert rows[-1]["kl_mean"] > 0


def test_adapter_reference_without_lora_is_a_recipe_error():
    from eksft.config import RecipeError

    with pytest.raises(RecipeError, match="sft: .*reference: adapter needs lora.enabled"):
        load_recipe(None, ["sft.reference=adapter"])


@pytest.mark.slow
def test_cli_sft_checkpoint_answers_through_vllm(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["sft", "--objective", "dft", "--set", "model.name=tiny:llama", "--set", "sft.max_steps=2",
                 "--set", "data.sft.num_examples=4", "--output", str(out)])
    assert code == 0 and "checkpoint:" in capsys.readouterr().out
    ckpt = out / "checkpoint"
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_smoke.py")), str(ckpt)],
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    assert json.loads(lines[-1].removeprefix("RESULT "))[str(ckpt)]["n_tokens"] > 0


def test_inspect_masks_writes_page(tmp_path, capsys):
    out = tmp_path / "masks.html"
    assert main(["inspect-masks", "--set", "model.name=tiny:qwen2", "--set", "data.sft.num_examples=3",
                 "--arm", "eksft", "-n", "2", "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("<h2>Example") == 2
    # Token spans carry a title (their values); the legend's spans of the same classes do not.
    assert 'class="tok both" title=' in page or 'class="tok entropy" title=' in page
    assert "KL set decided by position ties" in page  # starting model == reference
    assert "H=" in page and "KL=" in page
    # Per example, ratio 0.2 (the default): |S_H| = |S_KL| = k = floor(n / 5), so the union removes k..2k tokens.
    summaries = re.findall(r"<p>(\d+) response tokens: (.*?)(?: &mdash;|</p>)", page)
    assert len(summaries) == 2
    for n, body in summaries:
        counts = {name: int(c) for c, name in re.findall(r"(\d+) ([^,]+)(?:, |$)", body)}
        removed = sum(c for name, c in counts.items() if name.startswith("removed"))
        k = int(n) // 5
        assert k >= 1 and k <= removed <= 2 * k, (n, counts)
        assert counts.get("kept (imitated)", 0) == int(n) - removed
    assert capsys.readouterr().out.count("(KL set decided by ties)") == 2  # the terminal rendering


def test_inspect_masks_uses_the_named_arms_selection(tmp_path, capsys):
    """--arm reads the arm's objective (here: ratio 0 selects nothing); without it, the choice is explicit."""
    out = tmp_path / "masks.html"
    arms = "arms=[{name: sft, objective: {name: sft}}, {name: none, objective: {name: eksft, ratio: 0.0}}]"
    common = ["inspect-masks", "--set", "model.name=tiny:qwen2", "--set", "data.sft.num_examples=3", "--set", arms,
              "-n", "2", "--out", str(out), "--quiet"]
    assert main([*common, "--arm", "none"]) == 0
    page = out.read_text()
    assert page.count("<h2>Example") == 2 and 'class="tok kept" title=' in page
    assert not any(f'class="tok {k}" title=' in page for k in ("entropy", "kl", "both"))
    assert main([*common, "--objective", "eksft"]) == 0  # no arm named eksft: eksft at its default ratio 0.2
    page = out.read_text()
    assert 'class="tok both" title=' in page or 'class="tok entropy" title=' in page
    capsys.readouterr()
    assert main([*common, "--arm", "nope"]) == 2
    assert "--arm nope: no such arm (arms: sft, none)" in capsys.readouterr().err
    assert main(common) == 2  # two arms with an objective: which one is not guessed
    assert "the recipe has 2 arms with an objective (sft, none): choose one with --arm" in capsys.readouterr().err


def test_bf16_weights_without_master_copy_are_flagged(tmp_path, capsys):
    """A bf16 model trained directly loses most updates of size lr; run_sft says so, float32 + autocast does not."""
    common = [*BASE, "sft.max_steps=1", "sft.batch_size=2", "sft.learning_rate=1e-5"]
    train([*common, "model.dtype=bfloat16", "sft.bf16=false"], tmp_path / "bf16")
    out = capsys.readouterr().out
    assert "[sft] WARNING: training bfloat16 parameters directly" in out and "lr=1e-05" in out
    train([*common, "sft.bf16=true"], tmp_path / "fp32")
    assert "training bfloat16 parameters directly" not in capsys.readouterr().out


@pytest.mark.parametrize("arm,extra", [("eksft", []), ("sft", []),
                                       ("eksft", ["sft.lora.enabled=true", "sft.lora.r=4", "sft.reference=adapter"])])
def test_the_stage_page_is_the_page_of_its_checkpoint(tmp_path, arm, extra):
    """run_sft writes masks.html from the models it trained with (no reload): the same page as `inspect-masks`
    on the checkpoint it saved, for a reference copy, no reference (sft) and the LoRA base as reference."""
    overrides = [*BASE, "sft.max_steps=2", "sft.batch_size=2", "data.sft.num_examples=4", *extra]
    final = train(overrides, tmp_path / "stage", arm)
    recipe = load_recipe(None, overrides)
    stage_page = SFTStageDir(tmp_path / "stage").masks.read_text()
    reloaded = run_inspect(recipe, recipe.arm(arm).objective, 5, str(final), tmp_path / "reloaded.html", terminal=False)

    def removed(page: str) -> list[str]:
        return re.findall(r'class="tok (kept|entropy|kl|both)"', page)

    assert stage_page.count("<h2>Example") == 4 and removed(stage_page) == removed(reloaded.read_text())
    if not extra:  # the same float32 weights, computed alike: the very same page (values on hover included)
        assert stage_page == reloaded.read_text()
