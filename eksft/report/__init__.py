"""Run reports: the post-RL tables with intervals and Δ to a baseline arm (markdown/CSV), pass@k curves,
timeline plots and an index.html for ``runs/<recipe>/``.

    from eksft.report import build_report, format_table
    build_report("runs/quickstart")   # -> runs/quickstart/report/
    print(format_table("runs/quickstart"))

File names and evaluation points of a run directory live in :mod:`eksft.layout` (``RunLayout``,
``benchmark_filename``, ``point_step``, ...), importable without matplotlib.
"""

__all__ = ["build_report", "format_table", "load_run"]


def build_report(run_dir, out_dir=None, baseline_arm=None):
    from eksft.report.build import build_report as _build

    return _build(run_dir, out_dir, baseline_arm)


def format_table(run_dir) -> str:
    from eksft.report.table import format_table as _fmt

    return _fmt(run_dir)


def load_run(run_dir):
    from eksft.report.data import load_run as _load

    return _load(run_dir)
