"""``eksft report RUN_DIR``. Wire it in eksft/cli.py with ``add_report_parser(sub)``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_report(args: argparse.Namespace) -> int:
    from eksft.report.build import build_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"report error: run directory not found: {run_dir}", file=sys.stderr)
        return 2
    out = build_report(run_dir, args.out)
    print((out / "table.md").read_text(encoding="utf-8"))
    print(f"[report] {out / 'index.html'}")
    return 0


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="build the results table, timeline plots and index.html of a run directory",
        description="Read a run directory (runs/<recipe>/: run.json, <arm>/sft/metrics.jsonl, <arm>/rl/metrics.jsonl, "
                    "<arm>/eval/<point>/<benchmark>.json) and write RUN_DIR/report/: table.md and table.csv (each arm "
                    "after SFT and after RL; avg@n with pass@n beside, per benchmark and averaged), entropy.png, "
                    "kl.png, reward.png and pass_at_k.png (SFT steps then RL steps on one x axis, one line per arm) "
                    "and index.html linking everything. Works on a run still in progress: missing evaluations "
                    "show as '—'. Prints the markdown table and the report path.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory of one recipe, e.g. runs/quickstart")
    p.add_argument("--out", "-o", default=None,
                   help="output directory (default: RUN_DIR/report; index.html's links assume the default)")
    p.set_defaults(func=cmd_report)
    return p
