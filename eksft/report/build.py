"""``build_report(run_dir)``: table.md, table.csv, the timeline plots and index.html under ``run_dir/report/``."""

from __future__ import annotations

import os
from pathlib import Path

from eksft import layout
from eksft.report.data import load_run
from eksft.report.page import render_index
from eksft.report.plots import arm_colours, write_plots
from eksft.report.table import Comparison, csv_text, format_table


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, baseline_arm: str | None = None) -> Path:
    """Write the report of ``run_dir`` (finished or in progress) and return its directory.

    ``out_dir`` defaults to ``run_dir/report``; index.html links to the run's files relative to
    ``run_dir/report``, so keep the default when the page's links matter. ``baseline_arm`` replaces the
    recipe's ``report.baseline_arm`` (ValueError naming the arms when there is no such arm).
    """
    run = load_run(run_dir)
    if baseline_arm is not None:
        if baseline_arm not in run.arms:
            raise ValueError(f"--baseline {baseline_arm}: no such arm (arms: {', '.join(run.arms)})")
        run.config = {**run.config, "report": {**(run.config.get("report") or {}), "baseline_arm": baseline_arm}}
    out = Path(out_dir) if out_dir is not None else layout.RunLayout(run.run_dir).report
    out.mkdir(parents=True, exist_ok=True)
    comparison = Comparison(run)
    _write_atomic(out / "table.md", format_table(run, comparison))
    _write_atomic(out / "table.csv", csv_text(run, comparison))
    plots = write_plots(run, out)
    _write_atomic(out / "index.html", render_index(run, comparison, plots, arm_colours(run.arms)))
    return out
