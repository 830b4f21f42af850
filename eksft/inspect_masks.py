"""Token-mask inspection: which tokens the objective removes from the imitation loss, and why.

For each example the policy and the reference are run once, the reference as the SFT stage runs it
(`eksft.sft.forward.ReferenceModel`: a frozen model, or the LoRA base with adapters disabled), and the
objective's own selection, the function its loss calls (`get_objective(name).select`: for EKSFT
`select_eksft_tokens`), gives the statistics and the sets. The result is an HTML page (values on hover)
and coloured terminal output. `write_masks_page` works on models already in memory (the SFT stage after
training); `run_inspect` loads them first.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import torch

from eksft.objectives import ObjectiveSettings, TokenSelection, get_objective
from eksft.sft.forward import ReferenceModel, causal_lm_logits
from rl.common.lora import eval_mode

# token class -> (css colour, rich style, legend text)
CLASSES = {
    "prompt": ("#9e9e9e", "dim", "prompt / not trained"),
    "kept": ("#1b5e20", "green", "kept (imitated)"),
    "entropy": ("#e65100", "black on dark_orange", "removed: high entropy"),
    "kl": ("#0d47a1", "white on blue", "removed: high KL to reference"),
    "both": ("#6a1b9a", "white on magenta", "removed: both"),
    "selected": ("#827717", "black on yellow", "in S_H or S_KL, kept (intersection mode)"),
}


@dataclass
class InspectedToken:
    text: str
    kind: str
    entropy: float
    kl: float
    logprob: float


def inspect_examples(policy, reference: ReferenceModel, examples: list[dict], tokenizer,
                     objective: ObjectiveSettings) -> list[tuple[list[InspectedToken], bool]]:
    """Per example: a list of InspectedToken, and whether the KL set was decided by ties."""
    select = get_objective(objective.name).select
    device = next(policy.parameters()).device
    out = []
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]], device=device)
        attention = torch.ones_like(ids)
        labels = torch.tensor([ex["labels"]], device=device)[:, 1:]
        with torch.no_grad():  # logits[:, t] predicts token t + 1: shifted as in training
            logits = causal_lm_logits(policy, ids, attention, 0)[:, :-1]
            ref_logits = reference.logits(policy, ids, attention, 0)[:, :-1]
            chosen = select(logits, labels, ref_logits, objective)
        texts = [tokenizer.decode([token]) for token in ex["input_ids"]]
        out.append((_tokens(texts, chosen), chosen.kl_ties))
    return out


def _tokens(texts: list[str], chosen: TokenSelection) -> list[InspectedToken]:
    """The first token (never predicted), then token t + 1 with what the selection did at position t."""
    mask, removed, s_h, s_kl = (x[0].tolist() for x in (chosen.mask, chosen.removed, chosen.s_entropy, chosen.s_kl))
    stats = chosen.stats
    entropy, kl, logprob = (x[0].tolist() for x in (stats.entropy, stats.kl, stats.label_logprob))
    tokens = [InspectedToken(texts[0], "prompt", 0.0, 0.0, 0.0)]
    for t, text in enumerate(texts[1:]):
        if not mask[t]:
            kind = "prompt"
        elif removed[t]:
            kind = "both" if s_h[t] and s_kl[t] else "entropy" if s_h[t] else "kl"
        else:
            kind = "selected" if s_h[t] or s_kl[t] else "kept"
        tokens.append(InspectedToken(text, kind, entropy[t], kl[t], logprob[t] if mask[t] else 0.0))
    return tokens


def render_html(results, config: ObjectiveSettings, title: str) -> str:
    legend = " ".join(f'<span class="tok {k}">{html.escape(v[2])}</span>' for k, v in CLASSES.items())
    css = "\n".join(f".{k} {{ color: {'#fff' if k in ('kl', 'both', 'entropy') else v[0]}; "
                    f"{'background:' + v[0] + ';' if k in ('kl', 'both', 'entropy') else ''} }}"
                    for k, v in CLASSES.items())
    blocks = []
    for i, (tokens, ties) in enumerate(results):
        spans = []
        for tok in tokens:
            tip = "" if tok.kind == "prompt" else f"H={tok.entropy:.4f}  KL={tok.kl:.5f}  log p(label)={tok.logprob:.3f}"
            spans.append(f'<span class="tok {tok.kind}" title="{html.escape(tip)}">{html.escape(tok.text)}</span>')
        counts = {k: sum(t.kind == k for t in tokens) for k in CLASSES}
        n_resp = sum(v for k, v in counts.items() if k != "prompt")
        note = (" &mdash; <b>KL set decided by position ties</b> (policy == reference, e.g. step 0)" if ties else "")
        blocks.append(
            f"<h2>Example {i + 1}</h2><p>{n_resp} response tokens: "
            + ", ".join(f"{counts[k]} {CLASSES[k][2]}" for k in CLASSES if k != "prompt" and counts[k])
            + f"{note}</p><pre>{''.join(spans)}</pre>"
        )
    settings = html.escape(config.model_dump_json())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; }}
pre {{ white-space: pre-wrap; line-height: 1.6; font-size: 14px; }}
.tok {{ border-radius: 3px; padding: 0 1px; }} .tok[title]:hover {{ outline: 2px solid #000; }}
{css}</style></head><body><h1>{html.escape(title)}</h1>
<p>Hover a response token to see its entropy, KL(policy || reference) and log-probability of the label.</p>
<p>Objective settings: <code>{settings}</code></p><p>{legend}</p>{''.join(blocks)}</body></html>
"""


def print_terminal(results) -> None:
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False)
    console.print(Text("Legend: ") + Text("  ").join(Text(v[2], style=v[1]) for v in CLASSES.values()))
    for i, (tokens, ties) in enumerate(results):
        console.rule(f"example {i + 1}" + (" (KL set decided by ties)" if ties else ""))
        text = Text()
        for tok in tokens:
            text.append(tok.text, style=CLASSES[tok.kind][1])
        console.print(text)


def write_masks_page(policy, reference, tokenizer, examples: list[dict], objective: ObjectiveSettings, out: Path, *,
                     n: int, terminal: bool = False, title: str = "EKSFT token masks") -> Path:
    """Write the page of the first ``n`` tokenized SFT examples (as `eksft.data.build_sft_dataset` returns them).

    ``policy``: a loaded causal LM (put in eval mode while it runs). ``reference``: the frozen starting model, or
    the LoRA ``policy`` itself (its base with adapters disabled is the reference), or a `ReferenceModel`.
    """
    with eval_mode(policy):
        results = inspect_examples(policy, _as_reference(policy, reference), examples[:n], tokenizer, objective)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(results, objective, title))
    if terminal:
        print_terminal(results)
    return out


def _as_reference(policy, reference) -> ReferenceModel:
    if isinstance(reference, ReferenceModel):
        return reference
    if reference is policy and hasattr(policy, "disable_adapter"):  # a PEFT model: its base is the reference
        return ReferenceModel("adapter")
    return ReferenceModel("copy", reference)


def run_inspect(recipe, objective: ObjectiveSettings, n: int, checkpoint: str | None, out: Path, *,
                terminal: bool = True) -> Path:
    """Load the starting model (the reference) and ``checkpoint`` (the policy; default: the starting model), in
    float32, and write the page of ``objective``'s selection on the recipe's first ``n`` SFT examples."""
    from eksft.models import load_model
    from eksft.data import build_sft_dataset

    reference, tokenizer = load_model(recipe.model.name, "float32", recipe.model.trust_remote_code, recipe.model.revision)
    policy = load_model(checkpoint, "float32", recipe.model.trust_remote_code)[0] if checkpoint else reference
    examples, _ = build_sft_dataset(recipe, tokenizer)
    title = f"EKSFT token masks: {checkpoint or recipe.model.name} on {recipe.data.sft.source}"
    return write_masks_page(policy, reference, tokenizer, examples, objective, out, n=n, terminal=terminal, title=title)
