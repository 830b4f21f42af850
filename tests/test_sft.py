"""The SFT stage on real (tiny) models, one worker: accumulation invariance, the shared-prefix forward, LoRA + adapter
reference, exact resume, CLI. Several workers: tests/test_sft_workers.py; the loop against the HF Trainer:
tests/test_sft_loop.py."""

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


def train(overrides: list[str], out: Path, arm: str = "eksft", on_step=None) -> Path:
    """run_sft on the objective of one of the default arms (sft, eksft), as the SFT stage of that arm."""
    recipe = load_recipe(None, overrides)
    return run_sft(recipe, recipe.arm(arm).objective, SFTStageDir(out), on_step=on_step)


@pytest.mark.parametrize("objective", ["eksft", "sft"])
def test_two_accumulation_steps_of_one_equal_one_batch_of_two(tmp_path, objective):
    common = [*BASE, "sft.max_steps=1", "arms.eksft.objective.ratio=0.3"]
    batch2 = train([*common, "sft.batch_size=2", "sft.grad_accum=1"], tmp_path / "b2", objective)
    accum2 = train([*common, "sft.batch_size=1", "sft.grad_accum=2"], tmp_path / "a2", objective)
    start = weights(Path(os.environ.get("EKSFT_CACHE", Path.home() / ".cache/eksft")) / "models/tiny-qwen2")
    w_b2, w_a2 = weights(batch2), weights(accum2)
    moved = max((w_b2[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-4  # the step did something
    # The update itself: its loss and gradient norm. The weights after AdamW agree except on a tiny share: its
    # first step, lr * g / (|g| + eps), is ~lr * sign(g), so float32 noise on a near-zero gradient component, here
    # from LM-head matmuls of different shapes, can move that weight by up to lr either way.
    differ = sum(int(((w_a2[k] - w_b2[k]).abs() > 1e-6 + 1e-5 * w_b2[k].abs()).sum()) for k in w_b2)
    assert differ / sum(w.numel() for w in w_b2.values()) < 1e-3  # weights agree except where the gradient is ~0
    m_b2, m_a2 = read_metrics(tmp_path / "b2")[0], read_metrics(tmp_path / "a2")[0]
    assert m_b2["loss"] == pytest.approx(m_a2["loss"], rel=1e-5)
    assert m_b2["grad_norm"] == pytest.approx(m_a2["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("prefix", ["shared", "none"])
@pytest.mark.parametrize("objective", ["eksft", "eksft-batch", "sft", "dft"])
def test_packed_rows_and_lm_head_on_labelled_positions_are_exact(objective, prefix, monkeypatch):
    """The batch runs as one packed row without padding, the common prefix (system prompt) computed once, and the
    head runs from the first labelled position on: loss, gradients and metrics (the EKSFT statistics, selection
    by sequence and by batch, and loss) equal one plain full-logits forward per batch, on prompts of different
    lengths; with ``prefix`` none, rows that share no prefix at all (plain padding-free packing)."""
    import eksft.sft.forward as forward
    import rl.common.packing as packing
    import eksft.sft.step as step
    from eksft.data import build_sft_dataset
    from eksft.models import load_model
    from eksft.objectives import get_objective

    torch.manual_seed(0)
    recipe = load_recipe(None, ["model.name=tiny:qwen2", "data.sft.num_examples=8", "data.max_length=128"])
    model, tokenizer = load_model("tiny:qwen2")
    reference, _ = load_model("tiny:qwen2")
    with torch.no_grad():  # a reference that differs from the policy, so KL selects by value
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    examples, _ = build_sft_dataset(recipe, tokenizer)
    batch = forward.pad_collate(tokenizer.pad_token_id)(examples[:4])
    ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if prefix == "none":  # every row starts with a different token: nothing in common
        ids[:, 0] = torch.tensor([11, 12, 13, 14])
    firsts = {int((row != -100).nonzero()[0]) for row in labels}
    assert len(firsts) > 1 and min(firsts) > 10  # prompts of different lengths, a long prefix to skip
    assert len(set(attention.sum(1).tolist())) > 1  # and of different total lengths (padding)
    name = objective.removesuffix("-batch")
    options = {"ratio": 0.3, "scope": "batch" if objective.endswith("-batch") else "sequence"}
    settings = get_objective(name).settings(**(options if name == "eksft" else {}))
    results = []
    for fast in (True, False):
        monkeypatch.setattr(packing, "takes_logits_to_keep", lambda m, keep=fast: keep)
        monkeypatch.setattr(step, "takes_logits_to_keep", lambda m, keep=fast: keep)
        seen = []  # (rows, positions) through the decoder, (rows, positions) through the LM head, per forward
        hooks = [model.model.register_forward_hook(lambda m, i, o: seen.append(("body", *o.last_hidden_state.shape[:2]))),
                 model.lm_head.register_forward_hook(lambda m, i, o: seen.append(("head", *o.shape[:2])))]
        model.zero_grad()
        first = step.first_predicting_position(model, labels)
        logits = forward.causal_lm_logits(model, ids, attention, first, packed=fast)
        with torch.no_grad():
            ref_logits = forward.causal_lm_logits(reference, ids, attention, first, packed=fast)[:, :-1]
        parts = get_objective(name).parts(logits[:, :-1], labels[:, first + 1:], ref_logits, settings)
        loss = parts.reduce()
        loss.backward()
        for hook in hooks:
            hook.remove()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((loss.detach(), grads, {k: float(v) for k, v in parts.metrics.items()}, seen))
    (loss_k, grad_k, metrics_k, seen_k), (loss_f, grad_f, metrics_f, seen_f) = results
    B, T = labels.shape
    shared = forward.common_prefix_length(ids, attention)
    if prefix == "shared":
        assert 10 < shared < min(firsts)  # the system prompt and chat-template header
    else:
        assert shared == 0
    first = min(firsts) - 1
    lengths = attention.sum(1).tolist()
    # the prefix but its last token once, then each row's rest behind a copy of that token: no padding
    prefix_length = max(shared, 1)
    packed = prefix_length - 1 + sum(n - prefix_length + 1 for n in lengths)
    assert packed < B * T
    wanted = sum(n - first for n in lengths)  # each row's positions from `first` to its end
    assert seen_k[:2] == [("body", 1, packed), ("head", 1, wanted)]
    assert seen_f[:2] == [("body", B, T), ("head", B, T)]
    torch.testing.assert_close(loss_k, loss_f, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_k, grad_f, rtol=0, atol=1e-6)
    assert metrics_k.keys() == metrics_f.keys()
    for name in metrics_k:
        assert metrics_k[name] == pytest.approx(metrics_f[name], rel=1e-5, abs=1e-6), name


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


class Killed(Exception):
    pass


def kill_at(step: int):
    """Simulates a killed run: the loop stops right after step ``step`` (its checkpoint, if any, written)."""

    def on_step(done: int, metrics: dict) -> None:
        if done == step:
            raise Killed(step)

    return on_step


def test_killed_run_resumes_exactly(tmp_path):
    overrides = [*BASE, "sft.max_steps=4", "sft.save_steps=2", "sft.batch_size=2", "sft.lr_scheduler=cosine",
                 "sft.learning_rate=5e-3"]
    full = train(overrides, tmp_path / "full")
    with pytest.raises(Killed):
        train(overrides, tmp_path / "killed", on_step=kill_at(3))
    ckpts = tmp_path / "killed/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2"]
    assert [r["step"] for r in read_metrics(tmp_path / "killed")] == [1, 2, 3]
    # Where a real kill can land: inside the save of checkpoint-4 (every file but trainer_state.json, which the
    # loop writes last) and inside a metrics write (half a line).
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
    from eksft.sft.forward import ReferenceModel

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
    """A bf16 model trained directly loses most updates of size lr; run_sft says so, float32 + bf16 compute does not."""
    common = [*BASE, "sft.max_steps=1", "sft.batch_size=2", "sft.learning_rate=1e-5"]
    train([*common, "model.dtype=bfloat16", "sft.bf16=false"], tmp_path / "bf16")
    out = capsys.readouterr().out
    assert "[sft] WARNING: model.dtype bfloat16: the trained weights and AdamW state are bfloat16" in out
    assert "lr=1e-05" in out
    train([*common, "sft.bf16=true"], tmp_path / "fp32")
    assert "WARNING: model.dtype" not in capsys.readouterr().out


@pytest.mark.parametrize("arm,extra", [("eksft", []), ("sft", []),
                                       ("eksft", ["sft.lora.enabled=true", "sft.lora.r=4", "sft.reference=adapter"])])
def test_the_stage_page_is_the_page_of_its_checkpoint(tmp_path, arm, extra):
    """run_sft writes masks.html from the checkpoint it saved against the starting model: the same page as
    `inspect-masks` on that checkpoint, for a reference copy, no reference (sft) and the LoRA base as reference."""
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


def test_gradient_checkpointing_trains_like_without(tmp_path):
    """sft.gradient_checkpointing recomputes each decoder layer in the backward, also through the packed
    shared-prompt forward (micro-batches of 2): the same update."""
    common = [*BASE, "sft.max_steps=2", "sft.batch_size=2", "sft.learning_rate=1e-3", "sft.kl_metric_every=1"]
    plain = train(common, tmp_path / "plain")
    recomputed = train([*common, "sft.gradient_checkpointing=true"], tmp_path / "ckpt")
    w_plain, w_ckpt = weights(plain), weights(recomputed)
    for k in w_plain:
        torch.testing.assert_close(w_ckpt[k], w_plain[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "ckpt")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
