"""The post-RL results tables, with intervals and paired differences to a baseline arm.

Rows: the starting model (evaluated once before any training, ``_base``), then each arm after its SFT stage
(arms without SFT have none) and after GRPO. Columns: the benchmarks, their unweighted average and
``Δ vs <baseline arm>`` (of the average, at the same stage). Two tables: avg@n (pass@1) and pass@n.

Every number is computed from the per-problem values of the evaluation JSON (``eksft.eval.runner.problem_values``)
with ``eksft.eval.stats``: a cell is the mean over problems with its percentile bootstrap interval; the average
resamples each benchmark's problems within the benchmark; Δ pairs the two arms' scores on the same problems
(bootstrap interval, sign-flip permutation p-value). A run with several seeds pools them: each cell is ``[S, P]``
(seeds x problems), the grand mean with the two-level bootstrap (seeds, then problems), and Δ pairs by seed too. Results written before per-problem values existed show
their number without an interval. Markdown, CSV (long format: one row per arm x stage x benchmark x metric,
with ``low``/``high``) and HTML renderings.
"""

from __future__ import annotations

import csv
import html
import io
import math
from dataclasses import dataclass, field

from eksft import layout
from eksft.eval.runner import problem_values
from eksft.eval.stats import stratified_bootstrap_ci, stratified_paired_difference
from eksft.report.data import RunData, number

MISSING = "—"  # em dash
AVERAGE = "average"
BEFORE_TRAINING = "before_training"  # the stage of the starting model's row
STAGES = (layout.AFTER_SFT.name, layout.AFTER_RL.name)
SEED = 0  # every interval of a report uses the same bootstrap seed: rebuilding it gives the same numbers


@dataclass(frozen=True)
class Estimate:
    """A fraction with its interval (None: not available; low/high None: no interval)."""

    value: float | None = None
    low: float | None = None
    high: float | None = None

    def markdown(self) -> str:
        """``"27.3 [22.1, 32.5]"`` in percent; ``"27.3"`` without an interval; ``"—"`` when missing."""
        if self.value is None:
            return MISSING
        if self.low is None or self.high is None:
            return pct(self.value)
        return f"{pct(self.value)} [{pct(self.low)}, {pct(self.high)}]"


@dataclass(frozen=True)
class Delta:
    """``mean(arm) - mean(baseline)`` on the same problems: interval and two-sided p-value."""

    diff: float
    low: float
    high: float
    p_value: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self) -> str:
        """``"+4.7 [-3.1, +12.5], p = 0.24"`` (percentage points)."""
        return f"{signed(self.diff)} [{signed(self.low)}, {signed(self.high)}], {p_text(self.p_value)}"

    def markdown(self) -> str:
        return f"**{self.text()}**" if self.excludes_zero else self.text()


@dataclass
class TableRow:
    arm: str                        # an arm, or layout.BASE_EVAL for the starting model
    stage: str                      # "before_training", "after_sft" or "after_rl"
    label: str                      # what the Stage column shows
    point: str                      # the evaluation point the row reads
    seed_records: dict[str, list[dict | None]] = field(default_factory=dict)  # benchmark -> evaluation JSON per seed

    @property
    def records(self) -> dict[str, dict | None]:
        """benchmark -> the first seed's evaluation JSON (what links, n and problem counts read)."""
        return {b: records[0] if records else None for b, records in self.seed_records.items()}

    @property
    def is_starting_model(self) -> bool:
        return self.arm == layout.BASE_EVAL

    @property
    def arm_label(self) -> str:
        return "starting model" if self.is_starting_model else self.arm


def pct(value: float | None) -> str:
    """0.3125 -> "31.2" (one decimal, percent); None -> "—"."""
    return MISSING if value is None else f"{100.0 * value:.1f}"


def signed(value: float) -> str:
    """A difference in percentage points with its sign: 0.047 -> "+4.7", -0.031 -> "-3.1"."""
    text = f"{100.0 * value:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else text


def p_text(p: float) -> str:
    """``"p = 0.24"``, ``"p = 0.006"``, ``"p < 0.001"``."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.1 else f"p = {p:.2f}"


def table_metrics(run: RunData) -> list[str]:
    """The metrics of the two Markdown tables: avg@n and pass@n (k = n)."""
    k = run.k
    return ["avg@n"] + ([f"pass@{k}"] if k and k > 1 else [])


def metric_title(run: RunData, metric: str) -> str:
    n = run.eval_n or run.k or "n"
    if metric == "avg@n":
        return f"avg@{n}: mean accuracy over the n = {n} samples of each problem (= pass@1)"
    return f"{metric}: solved by at least one of k = {metric.split('@')[1]} samples (unbiased pass@k)"


def record_number(record: dict, metric: str) -> float | None:
    """A metric's benchmark-level value as the evaluation JSON states it (for results without per-problem values)."""
    name, _, k = metric.partition("@")
    if metric in ("avg@n", "coverage"):
        return number(record.get(metric))
    if metric == "distinct_answers":
        return number(record.get("distinct_answers_mean"))
    if name in ("pass", "maj"):
        return number((record.get(f"{name}@k") or {}).get(k))
    return number(record.get(metric))


def _interval(value: float) -> float | None:
    return None if math.isnan(value) else value


def same_problems(a: dict, b: dict) -> bool:
    """Whether two evaluations are of the same problems in the same order (so their scores pair up)."""
    pa, pb = a.get("samples") or [], b.get("samples") or []
    return len(pa) == len(pb) > 0 and all(x.get("problem") == y.get("problem") for x, y in zip(pa, pb))


# ----------------------------------------------------------------------------- rows and their statistics


def table_rows(run: RunData) -> list[TableRow]:
    rows = [TableRow(layout.BASE_EVAL, BEFORE_TRAINING, "before training", layout.BEFORE_SFT.name,
                     {b: run.seed_base_records(b) for b in run.benchmarks})]
    for arm in run.arms:
        for stage in STAGES:
            if stage == layout.AFTER_SFT.name and run.sft_steps.get(arm, 0) == 0:
                continue
            label = "after SFT" if stage == layout.AFTER_SFT.name else "after RL"
            rows.append(TableRow(arm, stage, label, stage, {b: run.seed_records(arm, stage, b) for b in run.benchmarks}))
    return rows


def seed_values(records: list[dict | None], metric: str) -> list[list[float]] | None:
    """``[S][P]`` per-problem values of ``metric`` at each seed (``eksft.eval.stats``' two-level input), or None when
    a seed has no record or no per-problem values, or the seeds did not evaluate the same problems in the same
    order (they must: the seeds change the sampling, not the problems)."""
    if not records or any(r is None for r in records) or not all(same_problems(records[0], r) for r in records[1:]):
        return None
    values = [problem_values(r, metric) for r in records]
    return None if any(v is None for v in values) else values


class Comparison:
    """The numbers of a run's tables: estimates with intervals, and Δ to the baseline arm (cached)."""

    def __init__(self, run: RunData, rows: list[TableRow] | None = None):
        self.run = run
        self.rows = table_rows(run) if rows is None else rows
        self.baseline = run.baseline_arm if len(run.arms) > 1 else None  # one arm: nothing to compare
        self._values: dict[tuple[int, str, str], list[float] | None] = {}
        self._memo: dict[tuple, Estimate | Delta | None] = {}  # the Markdown, CSV and HTML read the same numbers

    def values(self, row: TableRow, metric: str, benchmark: str) -> list[list[float]] | None:
        """``[S][P]``: the row's per-problem values at each seed (``seed_values``)."""
        key = (id(row), metric, benchmark)
        if key not in self._values:
            self._values[key] = seed_values(row.seed_records.get(benchmark) or [], metric)
        return self._values[key]

    def estimate(self, row: TableRow, metric: str, benchmark: str | None = None) -> Estimate:
        """One benchmark's cell, or (benchmark None) the average over the benchmarks when all are present."""
        key = ("estimate", id(row), metric, benchmark)
        if key not in self._memo:
            self._memo[key] = self._estimate(row, metric, benchmark)
        return self._memo[key]

    def _estimate(self, row: TableRow, metric: str, benchmark: str | None) -> Estimate:
        benchmarks = self.run.benchmarks if benchmark is None else [benchmark]
        if not benchmarks:
            return Estimate()
        values = [self.values(row, metric, b) for b in benchmarks]
        if all(v is not None for v in values):
            est, low, high = stratified_bootstrap_ci(values, level=self.run.level, n_boot=self.run.n_boot, seed=SEED)
            return Estimate(est, _interval(low), _interval(high))
        # results without per-problem values: the mean of their stated numbers over seeds and benchmarks
        stated = [record_number(r, metric) if r else None for b in benchmarks for r in row.seed_records.get(b) or [None]]
        if any(v is None for v in stated):  # a partial average would mislead
            return Estimate()
        return Estimate(sum(stated) / len(stated))

    def baseline_row(self, row: TableRow) -> TableRow | None:
        if self.baseline is None or row.is_starting_model or row.arm == self.baseline:
            return None
        return next((r for r in self.rows if r.arm == self.baseline and r.stage == row.stage), None)

    def delta(self, row: TableRow, metric: str, benchmark: str | None = None) -> Delta | None:
        """Δ of ``row`` to the baseline arm at the same stage (None: baseline row, or not both evaluated on the
        same problems)."""
        key = ("delta", id(row), metric, benchmark)
        if key not in self._memo:
            self._memo[key] = self._delta(row, metric, benchmark)
        return self._memo[key]

    def _delta(self, row: TableRow, metric: str, benchmark: str | None) -> Delta | None:
        base = self.baseline_row(row)
        if base is None:
            return None
        benchmarks = self.run.benchmarks if benchmark is None else [benchmark]
        pairs = []
        for b in benchmarks:
            a_rec, b_rec = row.records.get(b), base.records.get(b)
            va, vb = self.values(row, metric, b), self.values(base, metric, b)
            if va is None or vb is None or not same_problems(a_rec, b_rec):
                return None
            pairs.append((va, vb))
        if not pairs:
            return None
        diff, low, high, p = stratified_paired_difference([a for a, _ in pairs], [b for _, b in pairs],
                                                          level=self.run.level, n_boot=self.run.n_boot, seed=SEED)
        if math.isnan(low):
            return None
        return Delta(diff, low, high, p)

    @property
    def compared_rows(self) -> list[TableRow]:
        """The rows compared with the baseline: every arm's but the baseline's own, at the stages the baseline
        has (a baseline without SFT has no after-SFT row to compare with)."""
        return [r for r in self.rows if self.baseline_row(r) is not None]

    def delta_cell(self, row: TableRow, metric: str) -> str:
        if self.baseline is not None and row.arm == self.baseline:
            return "baseline"
        if self.baseline_row(row) is None:
            return ""  # the starting model, or a stage the baseline does not have
        d = self.delta(row, metric)
        return MISSING if d is None else d.markdown()


# ----------------------------------------------------------------------------- Markdown


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _num_problems(run: RunData) -> str:
    counts = sorted({int(r["num_problems"]) for r in _records(run) if isinstance(r.get("num_problems"), int)})
    if not counts:
        return ""
    return f"{counts[0]} problems per benchmark" if len(counts) == 1 else \
        f"{counts[0]}-{counts[-1]} problems per benchmark"


def _records(run: RunData):
    yield from run.base_evals.values()
    for arm in run.evals.values():
        for point in arm.values():
            yield from point.values()


def header_note(run: RunData, baseline: str | None = None) -> str:
    n = run.eval_n
    if n is None and run.k is None:
        return "No evaluations yet. Each cell will show **avg@n** and **pass@n** in percent with 95% intervals."
    level = f"{100 * run.level:g}%"
    size = ", ".join(x for x in (f"n = {n if n is not None else '?'} samples per problem", _num_problems(run),
                                 _seeds_text(run)) if x)
    if run.num_seeds > 1:
        note = (f"{size}. Numbers in percent: the mean over seeds and problems; in brackets the {level} interval "
                f"(two-level percentile bootstrap, {run.n_boot} resamples: the seeds, then the problems; the average "
                "resamples each benchmark's problems within it).")
    else:
        note = (f"{size}. Numbers in percent; in brackets the {level} interval (percentile bootstrap over the "
                f"problems, {run.n_boot} resamples; the average resamples each benchmark's problems within it).")
    if baseline is not None:
        paired = "the same problems and seeds" if run.num_seeds > 1 else "the same problems"
        note += (f" **Δ vs {baseline}**: the arm's average minus {baseline}'s at the same stage, in points, paired "
                 f"over {paired}, with its {level} interval and the p-value of a two-sided sign-flip "
                 "permutation test; **bold** when the interval excludes 0.")
    return note


def _seeds_text(run: RunData) -> str:
    """``"3 seeds (0, 1, 2)"``; empty for a run without seeds."""
    if run.seeds == [None]:
        return ""
    return f"{run.num_seeds} seed{'s' if run.num_seeds > 1 else ''} ({', '.join(map(str, run.seeds))})"


def markdown_table(run: RunData, metric: str = "avg@n", comparison: Comparison | None = None) -> str:
    """Only the pipe table of one metric."""
    comparison = comparison or Comparison(run)
    delta_head = [f"Δ vs {_md_escape(comparison.baseline)}"] if comparison.baseline else []
    head = ["Arm", "Stage", *[_md_escape(b) for b in run.benchmarks], "Average", *delta_head]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join([":---", ":---"] + ["---:"] * (len(run.benchmarks) + 1 + len(delta_head))) + "|"]
    for r in comparison.rows:
        cells = [_md_escape(r.arm_label), r.label,
                 *[comparison.estimate(r, metric, b).markdown() for b in run.benchmarks],
                 comparison.estimate(r, metric).markdown()]
        if comparison.baseline:
            cells.append(comparison.delta_cell(r, metric))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def noise_sentence(run: RunData, comparison: Comparison) -> str:
    """Which differences to the baseline (average column, both tables) are and are not told apart from noise.

    A difference counts as distinguishable when its interval excludes 0 and the permutation test rejects at the
    same level; when only one of them does (few problems, few differing ones) it is called borderline.
    """
    if comparison.baseline is None:
        return ""
    clear, borderline, unclear, missing = [], [], [], []
    for r in comparison.compared_rows:
        for metric in table_metrics(run):
            name = metric if metric != "avg@n" else f"avg@{run.eval_n or 'n'}"
            d = comparison.delta(r, metric)
            what = f"{r.arm} {r.label} {name}"
            if d is None:
                if f"{r.arm} {r.label}" not in missing:
                    missing.append(f"{r.arm} {r.label}")
            elif d.excludes_zero and d.p_value < 1 - run.level:
                clear.append(f"{what} ({signed(d.diff)} points, {p_text(d.p_value)})")
            elif d.excludes_zero or d.p_value < 1 - run.level:
                borderline.append(f"{what} ({d.text()})")
            else:
                unclear.append(f"{what} ({d.text()})")
    size = ", ".join(x for x in (_num_problems(run), _seeds_text(run)) if x) or "these sizes"
    parts = [f"**Against {comparison.baseline}, at {size} and n = {run.eval_n or '?'}:**",
             "distinguishable from noise (the interval excludes 0 and p < "
             f"{1 - run.level:.2g}): " + ("; ".join(clear) or "none") + "."]
    if borderline:
        parts.append("Borderline (the interval and the permutation test disagree: too few problems to tell): "
                     + "; ".join(borderline) + ".")
    parts.append("Not distinguishable from noise: " + ("; ".join(unclear) or "none") + ".")
    if missing:
        parts.append("Not comparable yet (an evaluation is missing, or not of the same problems): "
                     + ", ".join(missing) + ".")
    return " ".join(parts)


LEGEND = (
    "Legend: *starting model* is the model before any training (the shared `before_sft` evaluation); each arm "
    "follows after its SFT stage (arms without SFT have no such row) and after GRPO. *Average* is the unweighted "
    f"mean over the benchmarks, shown only when every benchmark is present. {MISSING} = not available (not run, "
    "or the run is still in progress)."
)


def format_table(run_dir_or_run, comparison: Comparison | None = None) -> str:
    """The content of ``report/table.md``: title, note, one table per metric, what is noise, legend.

    Accepts a run directory or a loaded :class:`RunData` (and its :class:`Comparison`, to reuse its numbers).
    """
    from eksft.report.data import load_run

    run = run_dir_or_run if isinstance(run_dir_or_run, RunData) else load_run(run_dir_or_run)
    comparison = comparison or Comparison(run)
    parts = [f"# Results: {run.recipe}", "", header_note(run, comparison.baseline), ""]
    for metric in table_metrics(run):
        parts += [f"## {metric_title(run, metric)}", "", markdown_table(run, metric, comparison), ""]
    sentence = noise_sentence(run, comparison)
    if sentence:
        parts += [sentence, ""]
    parts += [LEGEND, ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- CSV


CSV_HEADER = ["arm", "stage", "label", "point", "benchmark", "n", "num_problems", "seeds", "metric", "estimate", "low", "high",
              "baseline", "delta", "delta_low", "delta_high", "p_value", "excludes_zero"]
STATED_ONLY = ("entropy_mean", "response_length_mean", "truncation_rate")  # no per-problem interval


def csv_metrics(run: RunData) -> list[str]:
    """Every metric of the CSV: avg@n, pass@1..n, maj@k, coverage, distinct answers (with intervals and Δ), then
    the stated-only ones."""
    n = run.k
    maj = sorted({int(k) for rec in _records(run) for k in (rec.get("maj@k") or {})})
    ks = range(1, n + 1) if n else []
    return ["avg@n", *[f"pass@{k}" for k in ks], *[f"maj@{k}" for k in maj], "coverage", "distinct_answers",
            *STATED_ONLY]


def _csv_num(v: float | None) -> str:
    return "" if v is None else repr(round(v, 6))


def csv_text(run: RunData, comparison: Comparison | None = None) -> str:
    """Long format: one line per row x (benchmark or ``average``) x metric; fractions (distinct answers: a count),
    empty where not available."""
    comparison = comparison or Comparison(run)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for r in comparison.rows:
        base = comparison.baseline_row(r)
        for b in [*run.benchmarks, None]:
            rec = r.records.get(b) if b is not None else None
            n = rec.get("n", "") if rec else (run.eval_n if b is None and run.eval_n is not None else "")
            problems = rec.get("num_problems", "") if rec else ""
            for metric in csv_metrics(run):
                if metric in STATED_ONLY:
                    if b is None:
                        continue  # no average of these: see each benchmark
                    est, d = Estimate(number(rec.get(metric)) if rec else None), None
                else:
                    est, d = comparison.estimate(r, metric, b), comparison.delta(r, metric, b)
                delta = [_csv_num(d.diff), _csv_num(d.low), _csv_num(d.high), _csv_num(d.p_value),
                         str(d.excludes_zero).lower()] if d else [""] * 5
                w.writerow([r.arm, r.stage, r.label, r.point, b if b is not None else AVERAGE, n, problems,
                            run.num_seeds, metric,
                            _csv_num(est.value), _csv_num(est.low), _csv_num(est.high),
                            base.arm if base is not None else "", *delta])
    return buf.getvalue()


# ----------------------------------------------------------------------------- HTML


def html_table(run: RunData, metric: str = "avg@n", comparison: Comparison | None = None,
               link_prefix: str = "../") -> str:
    """One metric's table as an HTML ``<table>``; each present cell links to its evaluation JSON."""
    comparison = comparison or Comparison(run)
    e = html.escape
    out = ['<table class="results">', "<thead><tr><th>Arm</th><th>Stage</th>"]
    out += [f"<th>{e(b)}</th>" for b in run.benchmarks]
    out.append("<th>Average</th>" + (f"<th>Δ vs {e(comparison.baseline)}</th>" if comparison.baseline else "")
               + "</tr></thead><tbody>")
    for i, r in enumerate(comparison.rows):
        cls = ' class="arm-start"' if i == 0 or comparison.rows[i - 1].arm != r.arm else ""
        out.append(f'<tr{cls}><td class="arm">{e(r.arm_label)}</td><td>{e(r.label)}</td>')
        files = run.base_eval_files if r.is_starting_model else run.eval_files.get(r.arm, {}).get(r.point, {})
        for b in run.benchmarks:
            c = comparison.estimate(r, metric, b)
            if c.value is None:
                out.append(f'<td class="num missing" title="{e(r.point)}: no evaluation yet">{MISSING}</td>')
                continue
            text, f = e(c.markdown()), files.get(b)
            if f is not None:
                href = link_prefix + "/".join(url_part(p) for p in f.relative_to(run.run_dir).parts)
                text = f'<a href="{e(href)}" title="{e(r.point)}/{e(f.name)}">{text}</a>'
            out.append(f'<td class="num">{text}</td>')
        avg = comparison.estimate(r, metric)
        out.append(f'<td class="num avg{" missing" if avg.value is None else ""}">{e(avg.markdown())}</td>')
        if comparison.baseline:
            d = comparison.delta(r, metric)
            cell = comparison.delta_cell(r, metric)
            strong = ' class="num delta clear"' if d is not None and d.excludes_zero else ' class="num delta"'
            out.append(f"<td{strong}>{e(cell.strip('*'))}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def url_part(part: str) -> str:
    """One path segment, percent-encoded for an href."""
    from urllib.parse import quote

    return quote(part, safe="")
