"""`eksft inspect-masks` shows the selection that training makes: the same tokens, at the same positions."""

import contextlib
import re
from pathlib import Path

import pytest
import torch

from eksft.config import LoraSettings, load_recipe
from eksft.inspect_masks import inspect_examples, run_inspect, write_masks_page
from eksft.models import load_model
from eksft.objectives import EKSFTSettings, SFTSettings
from eksft.data import build_sft_dataset
from eksft.sft.forward import ReferenceModel
from eksft.sft.step import ObjectiveStepLoss, SFTMicroBatch
from rl.common.lora import wrap_with_lora

RECIPE = ["model.name=tiny:qwen2", "data.sft.num_examples=4", "data.max_length=128"]
REMOVED = ("entropy", "kl", "both")


def perturbed(parameters, seed: int) -> None:
    """Move the weights a little, so that policy and reference differ and KL selects by value, not by ties."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def policy_and_reference(mode: str):
    """A policy and the reference as the SFT stage holds them: a frozen copy, or the LoRA policy's own base."""
    policy, tokenizer = load_model("tiny:qwen2")
    if mode == "copy":
        reference, _ = load_model("tiny:qwen2")
        perturbed(reference.parameters(), 0)
        return policy, reference, ReferenceModel("copy", reference), tokenizer
    policy = wrap_with_lora(policy, LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0))
    perturbed([p for name, p in policy.named_parameters() if "lora_B" in name], 1)  # fresh B = 0: no change
    return policy, policy, ReferenceModel("adapter"), tokenizer


class Models:
    """What the cold start's loss reads of a trainer worker (its policy, device and reference), here unsharded."""

    def __init__(self, policy, reference: ReferenceModel):
        self.model, self.device, self._reference = policy, torch.device("cpu"), reference

    @contextlib.contextmanager
    def reference_model(self):
        if self._reference.mode == "copy":
            yield self._reference.copy
        else:
            from rl.common.lora import adapters_disabled

            with torch.no_grad(), adapters_disabled(self.model) as base:
                yield base


def trained_positions(loss_fn: ObjectiveStepLoss, models: Models, example: dict) -> set[int]:
    """Shifted positions whose cross-entropy the training step backpropagates (the loss path, not the page's)."""
    head = models.model.get_output_embeddings()
    captured = []

    def keep(module, inputs, output):
        if output.requires_grad:  # the policy's forward (the reference's runs without grad)
            output.retain_grad()
            captured.append(output)

    hook = head.register_forward_hook(keep)
    loss, _, _ = loss_fn(models, SFTMicroBatch.of([example]), [1.0])
    hook.remove()
    loss.backward()
    logits = captured[-1]  # the policy's logits of positions first .. T-1 (the last predicts nothing)
    first = len(example["input_ids"]) - logits.shape[1]
    return {first + j for j in (logits.grad[0].abs().sum(-1) > 0).nonzero()[:, 0].tolist()}


@pytest.mark.parametrize("mode", ["copy", "adapter"])
def test_page_removes_exactly_the_tokens_training_leaves_out(mode, tmp_path):
    recipe = load_recipe(None, RECIPE)
    policy, reference, trainer_reference, tokenizer = policy_and_reference(mode)
    examples, _ = build_sft_dataset(recipe, tokenizer)
    # Without regularisers the loss is the CE of the kept tokens: its gradient marks exactly what training keeps.
    settings = EKSFTSettings(ratio=0.3, lambda_entropy=0.0, lambda_kl=0.0)
    loss_fn = ObjectiveStepLoss(settings, tokenizer.pad_token_id, with_reference=True)
    models = Models(policy, trainer_reference)
    with torch.no_grad():
        results = inspect_examples(policy, trainer_reference, examples[:3], tokenizer, settings)
    removed_somewhere = False
    for example, (tokens, ties) in zip(examples, results):
        # tokens[t + 1] is the token predicted at shifted position t
        kinds = {t: tok.kind for t, tok in enumerate(tokens[1:])}
        labelled = {t for t, label in enumerate(example["labels"][1:]) if label != -100}
        assert {t for t, kind in kinds.items() if kind != "prompt"} == labelled
        kept = {t for t, kind in kinds.items() if kind == "kept"}
        removed = {t for t, kind in kinds.items() if kind in REMOVED}
        assert kept | removed == labelled and len(removed) >= int(0.3 * len(labelled))
        assert trained_positions(loss_fn, models, example) == kept
        assert not ties  # the reference differs: the KL set is decided by values
        removed_somewhere |= bool(removed)
    assert removed_somewhere
    # The page's writer takes the LoRA policy itself as its reference (adapters disabled), or the frozen copy.
    page = write_masks_page(policy, reference, tokenizer, examples, settings, tmp_path / "m.html",
                            n=3).read_text()
    assert page.count("<h2>Example") == 3 and "KL set decided by position ties" not in page


def test_run_inspect_uses_the_objective_it_is_given(tmp_path):
    """ratio 0 removes nothing; `sft` removes nothing; the default EKSFT ratio removes floor(n / 5) to 2 floor(n / 5)."""
    recipe = load_recipe(None, RECIPE)
    out = tmp_path / "masks.html"
    for settings in (EKSFTSettings(ratio=0.0), SFTSettings()):
        page = run_inspect(recipe, settings, 2, None, out, terminal=False).read_text()
        assert page.count("<h2>Example") == 2 and 'class="tok kept" title=' in page
        assert not any(f'class="tok {kind}" title=' in page for kind in REMOVED)
        assert f"&quot;name&quot;:&quot;{settings.name}&quot;" in page  # the settings shown are the ones used
    page = run_inspect(recipe, EKSFTSettings(), 2, None, out, terminal=False).read_text()
    assert "KL set decided by position ties" in page  # the starting model is its own reference
    for n, body in re.findall(r"<p>(\d+) response tokens: (.*?)(?: &mdash;|</p>)", page):
        counts = {name: int(c) for c, name in re.findall(r"(\d+) ([^,]+)(?:, |$)", body)}
        removed = sum(c for name, c in counts.items() if name.startswith("removed"))
        assert int(n) // 5 <= removed <= 2 * (int(n) // 5) and counts.get("kept (imitated)", 0) == int(n) - removed
