"""Token-mask inspection: which tokens EKSFT removes from the imitation loss, and why.

For each example the policy (a checkpoint, or the starting model) and the reference (the
starting model) are run once; entropy and KL are computed exactly as in training
(``token_entropy_and_kl``) and the recipe's selection is applied (``select_masked_tokens``).
The result is an HTML page (values on hover) and coloured terminal output.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import torch

from eksft.objectives import IGNORE_INDEX, ObjectiveConfig, select_masked_tokens, selection_decided_by_ties, token_entropy_and_kl

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


def inspect_examples(policy, reference, examples: list[dict], tokenizer, config: ObjectiveConfig):
    """Per example: a list of InspectedToken, and whether the KL set was decided by ties."""
    out = []
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor([ex["labels"]])[:, 1:]
        with torch.no_grad():
            logits = policy(input_ids=ids).logits[:, :-1].float()
            ref_logits = reference(input_ids=ids).logits[:, :-1].float()
        mask = labels != IGNORE_INDEX
        entropy, kl = token_entropy_and_kl(logits, ref_logits, mask, config.chunk_size)
        removed, s_h, s_kl = select_masked_tokens(
            entropy, kl, mask, config.ratio, combine=config.combine, largest_entropy=config.largest_entropy,
            largest_kl=config.largest_kl, scope=config.scope,
        )
        logprob = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        tokens = [InspectedToken(tokenizer.decode([ex["input_ids"][0]]), "prompt", 0.0, 0.0, 0.0)]
        for t in range(labels.shape[1]):
            if not mask[0, t]:
                kind = "prompt"
            elif removed[0, t]:
                kind = "both" if s_h[0, t] and s_kl[0, t] else "entropy" if s_h[0, t] else "kl"
            elif s_h[0, t] or s_kl[0, t]:
                kind = "selected"
            else:
                kind = "kept"
            tokens.append(InspectedToken(tokenizer.decode([ex["input_ids"][t + 1]]), kind, float(entropy[0, t]),
                                         float(kl[0, t]), float(logprob[0, t]) if mask[0, t] else 0.0))
        out.append((tokens, selection_decided_by_ties(kl, s_kl, mask, scope=config.scope)))
    return out


def render_html(results, config: ObjectiveConfig, title: str) -> str:
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


def run_inspect(recipe, objective: ObjectiveConfig, n: int, checkpoint: str | None, out: Path, *,
                terminal: bool = True) -> Path:
    from eksft.models import load_model
    from eksft.sft import build_sft_dataset

    reference, tokenizer = load_model(recipe.model.name, "float32", recipe.model.trust_remote_code)
    policy = load_model(checkpoint, "float32", recipe.model.trust_remote_code)[0] if checkpoint else reference
    examples, _ = build_sft_dataset(recipe, tokenizer)
    results = inspect_examples(policy.eval(), reference.eval(), examples[:n], tokenizer, objective)
    title = f"EKSFT token masks: {checkpoint or recipe.model.name} on {recipe.data.sft.source}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(results, objective, title))
    if terminal:
        print_terminal(results)
    return out
