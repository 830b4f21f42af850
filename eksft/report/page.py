"""``report/index.html``: the table, the plots and links to every file of the run (relative links, inline CSS)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from eksft import layout
from eksft.report.data import RunData
from eksft.report.table import LEGEND, Comparison, header_note, html_table, metric_title, noise_sentence, table_metrics, url_part

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #222;
       max-width: 1200px; margin: 1.5em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd;
     padding-bottom: .2em; margin-top: 1.6em; }
.meta { color: #555; font-size: .92em; } code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
table { border-collapse: collapse; margin: .6em 0; font-size: .93em; }
th, td { border: 1px solid #d0d0d0; padding: .3em .6em; } th { background: #f2f4f7; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.missing { color: #aaa; text-align: center; } td.avg { font-weight: 600; background: #fafafa; }
td.delta { color: #555; } td.delta.clear { color: #111; font-weight: 700; }
tr.arm-start td { border-top: 2px solid #999; } td.arm { font-weight: 600; }
td a { color: inherit; text-decoration: none; } td a:hover { text-decoration: underline; }
.note { font-size: .9em; color: #444; max-width: 60em; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 1em; }
figure { margin: 0; border: 1px solid #e3e3e3; border-radius: 4px; padding: .4em; background: #fff; }
figure img { width: 100%; height: auto; display: block; } figcaption { font-size: .85em; color: #555; }
.swatch { display: inline-block; width: .9em; height: .9em; border-radius: 2px; vertical-align: -0.1em;
          margin-right: .3em; }
ul.files { margin: .3em 0 .8em 0; } ul.files li { margin: .1em 0; } .absent { color: #999; }
.done { color: #2e7d32; font-weight: 600; } .running { color: #e65100; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; }
"""

PLOT_CAPTIONS = [
    ("pass_at_k.png", "pass@1 and pass@n averaged over the benchmarks at each evaluation point."),
    ("reward.png", "Mean GRPO reward per RL step."),
    ("entropy.png", "Mean token entropy: on the SFT data during SFT, on the policy's own samples during RL."),
    ("kl.png", "KL to the base model: on the SFT data during SFT, k3 estimate on its samples during RL."),
]


def _href(run: RunData, path: Path) -> str:
    """Link from report/ to a file of the run directory."""
    rel = path.relative_to(run.run_dir)
    return "../" + "/".join(url_part(p) for p in rel.parts)


def _link(run: RunData, path: Path, text: str | None = None) -> str:
    e = html.escape
    return f'<a href="{e(_href(run, path))}">{e(text or str(path.relative_to(run.run_dir)))}</a>'


def _done(path: Path) -> str:
    return '<span class="done">done</span>' if path.exists() else '<span class="running">not done</span>'


def _progress(run: RunData, colours: dict[str, str]) -> str:
    e = html.escape
    seeded = run.seeds != [None]
    out = ["<table><thead><tr><th>Arm</th>" + ("<th>Seed</th>" if seeded else "") + "<th>SFT steps logged / planned</th>"
           "<th>SFT</th><th>RL steps logged / planned</th><th>RL</th><th>Evaluations (benchmarks present)</th></tr>"
           "</thead><tbody>"]
    for arm, view in ((a, v) for a in run.arms for v in run.views):
        sft_logged = max((int(r["step"]) for r in view.sft_metrics.get(arm, []) if "step" in r), default=0)
        rl_logged = max((int(r["step"]) for r in view.rl_metrics.get(arm, []) if "step" in r), default=0)
        planned_rl = run.arm_rl_steps(arm)
        arm_dir = layout.RunLayout(run.run_dir).arm(arm, view.seed)
        sft_cell = "no SFT" if run.sft_steps.get(arm, 0) == 0 else _done(arm_dir.sft.done_marker)
        pts = view.evals.get(arm, {})
        evals = ", ".join(f"{e(p)} ({len(pts[p])}/{len(run.benchmarks)})"
                          for p in sorted(pts, key=layout.point_sort_key)) or '<span class="absent">none yet</span>'
        out.append(f'<tr><td class="arm"><span class="swatch" style="background:{colours[arm]}"></span>{e(arm)}</td>'
                   + (f'<td class="num">{view.seed}</td>' if seeded else "") +
                   f'<td class="num">{sft_logged} / {run.sft_steps.get(arm, 0)}</td><td>{sft_cell}</td>'
                   f'<td class="num">{rl_logged} / {"?" if planned_rl is None else planned_rl}</td>'
                   f'<td>{_done(arm_dir.rl.done_marker)}</td><td>{evals}</td></tr>')
    out.append("</tbody></table>")
    return "\n".join(out)


def _arm_files(run: RunData, arm: str) -> str:
    """The arm's files: every seed's (a heading per seed when the run has seeds)."""
    if run.seeds == [None]:
        return _arm_seed_files(run, arm)
    return "\n".join(_arm_seed_files(view, arm, f"{arm}, seed {view.seed}") for view in run.views)


def _arm_seed_files(run: RunData, arm: str, title: str | None = None) -> str:
    e = html.escape
    items = []
    arm_dir = layout.RunLayout(run.run_dir).arm(arm, run.seed)
    masks = arm_dir.sft.masks
    if masks.exists():
        items.append(f"<li><b>token-mask inspection</b>: {_link(run, masks)}</li>")
    for label, path in (("SFT metrics", arm_dir.sft.metrics), ("RL metrics", arm_dir.rl.metrics)):
        if path.exists():
            items.append(f"<li>{label}: {_link(run, path)}</li>")
    files = run.eval_files.get(arm, {})
    for point in sorted(files, key=layout.point_sort_key):
        links = ", ".join(_link(run, f, b) for b, f in files[point].items())
        items.append(f"<li>eval <code>{e(point)}</code>: {links}</li>")
    if not items:
        items.append('<li class="absent">no files yet</li>')
    return f"<h3>{e(title or arm)}</h3>\n<ul class=\"files\">\n" + "\n".join(items) + "\n</ul>"


def _md_inline(text: str) -> str:
    """The tiny markdown used in the table note/legend: **bold**, *italic*, `code`."""
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"\*(.+?)\*", r"<i>\1</i>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def _curve_figures(plots: dict[str, Path]) -> list[tuple[str, str]]:
    """(file name, caption) of each benchmark's pass@k-against-k plot."""
    prefix = "pass_at_k_curves:"
    return [(path.name, f"pass@k against k on {key[len(prefix):]}: the starting model, after SFT and after RL, per arm, "
                        "with interval bands (bootstrap over problems; over seeds, then problems, when the run has "
                        "seeds).")
            for key, path in plots.items() if key.startswith(prefix)]


def render_index(run: RunData, comparison: Comparison, plots: dict[str, Path], colours: dict[str, str]) -> str:
    e = html.escape
    run_json = layout.RunLayout(run.run_dir).run_json
    steps = ", ".join(f"{e(a)} {run.sft_steps.get(a, 0)}" for a in run.arms)
    meta = (f'<p class="meta">Arms: {e(", ".join(run.arms))} &middot; benchmarks: {e(", ".join(run.benchmarks))} '
            + (f' &middot; seeds: {e(", ".join(map(str, run.seeds)))}' if run.seeds != [None] else "") +
            f' &middot; n = {run.eval_n if run.eval_n is not None else "?"} samples per problem &middot; SFT steps: '
            f'{steps} &middot; RL steps: {run.rl_steps if run.rl_steps is not None else "per arm / unknown"}'
            + (f" &middot; {_link(run, run_json, 'run.json')}" if run_json.exists() else "") + "</p>")
    plot_html = []
    names = {p.name for p in plots.values()}
    for fname, caption in [*PLOT_CAPTIONS[:1], *_curve_figures(plots), *PLOT_CAPTIONS[1:]]:
        if fname in names:
            plot_html.append(f'<figure><a href="{e(fname)}"><img src="{e(fname)}" alt="{e(caption)}"></a>'
                             f"<figcaption>{e(caption)}</figcaption></figure>")
    tables = "\n".join(f"<h3>{e(metric_title(run, m))}</h3>\n{html_table(run, m, comparison)}"
                       for m in table_metrics(run))
    config = ""
    if run.config:
        config = ("<h2>Config</h2><details><summary>recipe config from run.json</summary><pre>"
                  + e(json.dumps(run.config, indent=2, sort_keys=True, default=str)) + "</pre></details>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>EKSFT report: {e(run.recipe)}</title>
<style>{CSS}</style></head>
<body>
<h1>EKSFT report: {e(run.recipe)}</h1>
{meta}
<h2>Results</h2>
<p class="note">{_md_inline(header_note(run, comparison.baseline))}</p>
{tables}
<p class="note">{_md_inline(noise_sentence(run, comparison))}</p>
<p class="note">{_md_inline(LEGEND)} Cells link to their evaluation JSON.
Also as <a href="table.md">table.md</a> and <a href="table.csv">table.csv</a>.</p>
<h2>Progress</h2>
{_progress(run, colours)}
<h2>Timeline</h2>
<p class="note">One x axis per plot: each arm's SFT steps, then its RL steps (RL step s at x = SFT steps + s).
Dashed vertical lines mark where an arm's SFT ends (the base arm has none: its RL starts at 0). Entropy and KL
are measured on the SFT data during SFT and on the policy's own samples during RL, so each arm's line has a gap
at its boundary.</p>
<div class="plots">
{chr(10).join(plot_html)}
</div>
<h2>Files</h2>
{chr(10).join(_arm_files(run, a) for a in run.arms)}
{config}
</body></html>
"""
