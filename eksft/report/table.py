"""The post-RL results table: rows arm x {after SFT, after RL}, columns benchmarks + average.

Each cell is ``avg@n (pass@k)`` in percent with k = n; markdown, CSV and HTML renderings.
"""

from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass, field

from eksft import layout
from eksft.report.data import RunData, number

MISSING = "—"  # em dash
AVERAGE = "average"
STAGES = (layout.AFTER_SFT.name, layout.AFTER_RL.name)


@dataclass
class Cell:
    avg: float | None = None      # avg@n, a fraction in [0, 1]
    pass_k: float | None = None   # pass@k with k = n
    record: dict | None = None    # the evaluation JSON (None for averages and missing cells)

    def markdown(self) -> str:
        return format_cell(self.avg, self.pass_k)


@dataclass
class TableRow:
    arm: str
    stage: str                    # "after_sft" or "after_rl"
    label: str                    # "after SFT", "after RL" or "base (no SFT)"
    point: str                    # the evaluation point the row reads
    cells: dict[str, Cell] = field(default_factory=dict)
    average: Cell = field(default_factory=Cell)


def pct(value: float | None) -> str:
    """0.3125 -> "31.2" (one decimal, percent); None -> "—"."""
    return MISSING if value is None else f"{100.0 * value:.1f}"


def format_cell(avg: float | None, pass_k: float | None) -> str:
    if avg is None:
        return MISSING
    return f"{pct(avg)} ({pct(pass_k)})"


def _pass_at(record: dict, k: int | None) -> float | None:
    table = record.get("pass@k") or {}
    if k is not None and str(k) in table:
        return number(table[str(k)])
    if k is not None and k in table:
        return number(table[k])
    return None


def row_point(run: RunData, arm: str, stage: str) -> str:
    """The evaluation point behind a table row: an arm without SFT reads ``before_sft`` for "after SFT"."""
    if stage == layout.AFTER_RL.name:
        return layout.AFTER_RL.name
    if run.sft_steps.get(arm, 0) == 0:
        pts = run.evals.get(arm, {})
        if layout.BEFORE_SFT.name not in pts and layout.AFTER_SFT.name in pts:
            return layout.AFTER_SFT.name
        return layout.BEFORE_SFT.name
    return layout.AFTER_SFT.name


def stage_label(run: RunData, arm: str, stage: str) -> str:
    if stage == layout.AFTER_RL.name:
        return "after RL"
    return "base (no SFT)" if run.sft_steps.get(arm, 0) == 0 else "after SFT"


def mean_or_none(values: list[float | None]) -> float | None:
    """Mean when every value is present (a partial average would mislead), else None."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def table_rows(run: RunData) -> list[TableRow]:
    k = run.k
    rows = []
    for arm in run.arms:
        for stage in STAGES:
            point = row_point(run, arm, stage)
            row = TableRow(arm, stage, stage_label(run, arm, stage), point)
            for b in run.benchmarks:
                rec = run.eval_record(arm, point, b)
                row.cells[b] = Cell() if rec is None else Cell(number(rec.get("avg@n")), _pass_at(rec, k), rec)
            row.average = Cell(mean_or_none([c.avg for c in row.cells.values()]),
                               mean_or_none([c.pass_k for c in row.cells.values()]))
            rows.append(row)
    return rows


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _num_problems(run: RunData) -> str:
    counts = sorted({int(r["num_problems"]) for a in run.evals.values() for p in a.values() for r in p.values()
                     if isinstance(r.get("num_problems"), int)})
    if not counts:
        return ""
    return f", {counts[0]} problems per benchmark" if len(counts) == 1 else \
        f", {counts[0]}-{counts[-1]} problems per benchmark"


def header_note(run: RunData) -> str:
    n, k = run.eval_n, run.k
    if n is None and k is None:
        return "No evaluations yet. Each cell will show **avg@n** with **pass@n** in parentheses, in percent."
    n_txt = "?" if n is None else str(n)
    k_txt = "?" if k is None else str(k)
    return (f"Each cell: **avg@{n_txt}** (mean accuracy over n = {n_txt} samples per problem) with "
            f"**pass@{k_txt}** (k = n = {k_txt}) in parentheses, in percent{_num_problems(run)}.")


def markdown_table(run: RunData, rows: list[TableRow] | None = None) -> str:
    """Only the pipe table."""
    rows = table_rows(run) if rows is None else rows
    head = ["Arm", "Stage", *[_md_escape(b) for b in run.benchmarks], "Average"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join([":---", ":---"] + ["---:"] * (len(run.benchmarks) + 1)) + "|"]
    for r in rows:
        cells = [_md_escape(r.arm), r.label, *[r.cells[b].markdown() for b in run.benchmarks], r.average.markdown()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LEGEND = (
    "Legend: rows are each arm after its SFT stage and after GRPO; *base (no SFT)* is the arm without SFT "
    "evaluated before any training (`before_sft`). *Average* is the unweighted mean over the benchmarks, "
    f"shown only when every benchmark is present. {MISSING} = evaluation not available (not run, or the run "
    "is still in progress)."
)


def format_table(run_dir_or_run) -> str:
    """The markdown table with its title, n/k note and legend (the content of ``report/table.md``).

    Accepts a run directory or a loaded :class:`RunData`.
    """
    from eksft.report.data import load_run

    run = run_dir_or_run if isinstance(run_dir_or_run, RunData) else load_run(run_dir_or_run)
    parts = [f"# Results: {run.recipe}", "", header_note(run), "", markdown_table(run), "", LEGEND, ""]
    return "\n".join(parts)


def _csv_num(v: float | None) -> str:
    return "" if v is None else repr(round(v, 6))


def csv_text(run: RunData, rows: list[TableRow] | None = None) -> str:
    """One row per arm x stage x benchmark plus one ``average`` row per arm x stage; fractions in [0, 1],
    empty where missing."""
    rows = table_rows(run) if rows is None else rows
    recs = [c.record for r in rows for c in r.cells.values() if c.record]
    pass_ks = sorted({int(k) for rec in recs for k in (rec.get("pass@k") or {})})
    maj_ks = sorted({int(k) for rec in recs for k in (rec.get("maj@k") or {})})
    if not pass_ks and run.k:
        pass_ks = list(range(1, run.k + 1))
    header = ["arm", "stage", "label", "point", "benchmark", "n", "num_problems", "avg@n",
              *[f"pass@{k}" for k in pass_ks], *[f"maj@{k}" for k in maj_ks]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        per_bench = []
        for b in run.benchmarks:
            rec = r.cells[b].record or {}
            passes = [number((rec.get("pass@k") or {}).get(str(k))) for k in pass_ks]
            majs = [number((rec.get("maj@k") or {}).get(str(k))) for k in maj_ks]
            per_bench.append((passes, majs))
            n = rec.get("n", "") if rec else ""
            w.writerow([r.arm, r.stage, r.label, r.point, b, n, rec.get("num_problems", "") if rec else "",
                        _csv_num(r.cells[b].avg), *map(_csv_num, passes), *map(_csv_num, majs)])
        avg_pass = [mean_or_none([p[i] for p, _ in per_bench]) for i in range(len(pass_ks))]
        avg_maj = [mean_or_none([m[i] for _, m in per_bench]) for i in range(len(maj_ks))]
        w.writerow([r.arm, r.stage, r.label, r.point, AVERAGE, run.eval_n if run.eval_n is not None else "", "",
                    _csv_num(r.average.avg), *map(_csv_num, avg_pass), *map(_csv_num, avg_maj)])
    return buf.getvalue()


def html_table(run: RunData, rows: list[TableRow] | None = None, link_prefix: str = "../") -> str:
    """The table as an HTML ``<table>``; each present cell links to its evaluation JSON (relative to report/)."""
    rows = table_rows(run) if rows is None else rows
    e = html.escape
    out = ['<table class="results">', "<thead><tr><th>Arm</th><th>Stage</th>"]
    out += [f"<th>{e(b)}</th>" for b in run.benchmarks]
    out.append("<th>Average</th></tr></thead><tbody>")
    for i, r in enumerate(rows):
        cls = ' class="arm-start"' if i == 0 or rows[i - 1].arm != r.arm else ""
        out.append(f'<tr{cls}><td class="arm">{e(r.arm)}</td><td>{e(r.label)}</td>')
        for b in run.benchmarks:
            c = r.cells[b]
            if c.avg is None:
                out.append(f'<td class="num missing" title="{e(r.point)}: no evaluation yet">{MISSING}</td>')
                continue
            f = run.eval_files.get(r.arm, {}).get(r.point, {}).get(b)
            text = e(c.markdown())
            if f is not None:
                href = link_prefix + "/".join(url_part(p) for p in f.relative_to(run.run_dir).parts)
                text = f'<a href="{e(href)}" title="{e(r.point)}/{e(f.name)}">{text}</a>'
            out.append(f'<td class="num">{text}</td>')
        avg = r.average.markdown()
        out.append(f'<td class="num avg{" missing" if r.average.avg is None else ""}">{e(avg)}</td></tr>')
    out.append("</tbody></table>")
    return "\n".join(out)


def url_part(part: str) -> str:
    """One path segment, percent-encoded for an href."""
    from urllib.parse import quote

    return quote(part, safe="")
