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
    try:
        out = build_report(run_dir, args.out, args.baseline)
    except ValueError as e:
        print(f"report error: {e}", file=sys.stderr)
        return 2
    print((out / "table.md").read_text(encoding="utf-8"))
    print(f"[report] {out / 'index.html'}")
    return 0


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="build the results table, timeline plots and index.html of a run directory",
        description="Read a run directory (runs/<recipe>/: run.json, <arm>/sft/metrics.jsonl, <arm>/rl/metrics.jsonl, "
                    "<arm>/eval/<point>/<benchmark>.json) and write RUN_DIR/report/: table.md and table.csv (the starting "
                    "model, each arm after SFT and after RL; avg@n and pass@n per benchmark and averaged, each with "
                    "its 95% bootstrap interval over the problems, and the difference to a baseline arm, paired "
                    "over the same problems, with its interval and a sign-flip permutation p-value; the CSV has "
                    "every pass@k, maj@k, coverage and distinct answers), pass_at_k_curves_<benchmark>.png (pass@k "
                    "against k with interval bands), entropy.png, kl.png, reward.png and pass_at_k.png (SFT steps "
                    "then RL steps on one x axis) and index.html linking everything. Works on a run still in "
                    "progress: missing evaluations show as '—'. Prints the markdown tables and the report path.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory of one recipe, e.g. runs/quickstart")
    p.add_argument("--out", "-o", default=None,
                   help="output directory (default: RUN_DIR/report; index.html's links assume the default)")
    p.add_argument("--baseline", default=None, metavar="ARM",
                   help="the arm the others are compared with (default: the recipe's report.baseline_arm, else the "
                        "first arm whose objective is sft)")
    p.set_defaults(func=cmd_report)
    return p
