"""Report plots, one colour per arm.

Timeline plots: SFT steps then RL steps on one x axis, one line per arm. RL step ``s`` of an arm is drawn at
``sft_steps[arm] + s``; evaluation points at :func:`eksft.layout.point_step`.

pass@k curves: per benchmark, pass@k against k = 1..n (log2 axis), one panel per arm with the starting
model, after SFT and after RL, each with a percentile bootstrap band over problems.

A run with several seeds: timelines and evaluation points show the mean over the seeds that have the value; the
pass@k curves pool the seeds (two-level bootstrap: seeds, then problems), as the table does.

Rendering uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from eksft import layout
from eksft.eval.stats import bootstrap_ci
from eksft.report.table import SEED, seed_values
from eksft.report.data import RunData, number

DPI = 120
FIGSIZE = (8.0, 4.6)
_FIXED_COLOURS = {"base": "#7f7f7f", "sft": "#1f77b4", "eksft": "#d62728", "dft": "#2ca02c"}
_CYCLE = ["#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#2ca02c", "#1f77b4", "#d62728"]


@dataclass
class Series:
    arm: str
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    points: list[str] = field(default_factory=list)  # evaluation point names (eval series only)
    n_sft: int = 0  # the first n_sft points are SFT steps, the rest RL steps (timeline series)

    def __len__(self) -> int:
        return len(self.x)


def arm_colours(arms: list[str]) -> dict[str, str]:
    """Stable colours: base grey, sft blue, eksft red, dft green; other arms take the next free colour."""
    colours = {}
    for arm in arms:
        if arm in _FIXED_COLOURS:
            colours[arm] = _FIXED_COLOURS[arm]
    used = set(colours.values())
    free = [c for c in _CYCLE if c not in used] or list(_CYCLE)
    i = 0
    for arm in arms:
        if arm not in colours:
            colours[arm] = free[i % len(free)]
            i += 1
    return colours


def timeline_series(run: RunData, sft_key: str | None, rl_key: str | None) -> dict[str, Series]:
    """Per arm: SFT metric ``sft_key`` at x = SFT step, then RL metric ``rl_key`` at x = sft_steps[arm] + RL step.

    Rows without the key (or with a non-finite value) are left out. Arms with no points are omitted.
    """
    out = {}
    views = run.views
    for arm in run.arms:
        s = Series(arm)
        offset = run.sft_steps.get(arm, 0)
        if sft_key:
            for step, v in _seed_mean([view.sft_metrics.get(arm, []) for view in views], sft_key):
                s.x.append(step)
                s.y.append(v)
        s.n_sft = len(s)
        if rl_key:
            for step, v in _seed_mean([view.rl_metrics.get(arm, []) for view in views], rl_key):
                s.x.append(offset + step)
                s.y.append(v)
        if len(s):
            out[arm] = s
    return out


def _seed_mean(rows_per_seed: list[list[dict]], key: str) -> list[tuple[float, float]]:
    """(step, mean of ``key`` over the seeds that logged it at that step), by step; one seed: its own rows."""
    by_step: dict[float, list[float]] = {}
    for rows in rows_per_seed:
        for r in rows:
            v, step = number(r.get(key)), number(r.get("step"))
            if v is not None and step is not None:
                by_step.setdefault(step, []).append(v)
    return [(step, sum(vs) / len(vs)) for step, vs in sorted(by_step.items())]


def _pass_value(rec: dict, k: int) -> float | None:
    v = number((rec.get("pass@k") or {}).get(str(k)))
    if v is None and k == 1:
        v = number(rec.get("avg@n"))
    return v


def eval_series(run: RunData, k: int) -> dict[str, Series]:
    """Per arm: pass@k averaged over the run's benchmarks at each evaluation point, at x = point_step(...).

    A point is used only when every benchmark has a value (a partial average would jump). When two points
    share an x (e.g. rl_step_N with N = rl_steps, and after_rl) the later one in time order wins.
    """
    out = {}
    views = run.views
    for arm in run.arms:
        by_x: dict[float, tuple[str, float]] = {}
        points = {p for view in views for p in view.evals.get(arm, {})}
        for point in sorted(points, key=layout.point_sort_key):
            if not layout.is_point(point):
                continue
            # the mean over the seeds whose evaluation has every benchmark (a partial average would jump)
            per_seed = []
            for view in views:
                got = view.evals.get(arm, {}).get(point, {})
                vals = [_pass_value(got[b], k) if b in got else None for b in run.benchmarks]
                if vals and all(v is not None for v in vals):
                    per_seed.append(sum(vals) / len(vals))
            if not per_seed:
                continue
            rl_steps = run.arm_rl_steps(arm)
            if point == layout.AFTER_RL.name and rl_steps is None:
                continue
            x = layout.point_step(point, run.sft_steps.get(arm, 0), rl_steps)
            by_x[x] = (point, sum(per_seed) / len(per_seed))
        if by_x:
            s = Series(arm)
            for x in sorted(by_x):
                s.x.append(x)
                s.points.append(by_x[x][0])
                s.y.append(by_x[x][1])
            out[arm] = s
    return out


@dataclass
class Curve:
    """pass@k of one evaluation against k, with its bootstrap interval; fractions in [0, 1]."""

    label: str  # "starting model", "after SFT" or "after RL"
    point: str  # the evaluation point it was read from
    num_problems: int
    ks: list[int] = field(default_factory=list)
    estimate: list[float] = field(default_factory=list)
    low: list[float] = field(default_factory=list)  # NaN when there is nothing to resample (one problem)
    high: list[float] = field(default_factory=list)


def _curve(run: RunData, label: str, point: str, records: list[dict | None]) -> Curve | None:
    """pass@1..pass@n of an evaluation at every seed (``[S, P]``: the two-level bootstrap), or None when a seed's
    record is missing or has no per-problem samples."""
    values = seed_values(records, "pass@1")
    if values is None:
        return None
    c = Curve(label, point, num_problems=len(values[0]))
    for k in range(1, records[0]["n"] + 1):  # problem_values checked that n is an int matching the samples
        est, low, high = bootstrap_ci(seed_values(records, f"pass@{k}"), level=run.level, n_boot=run.n_boot,
                                      seed=SEED)
        c.ks.append(k)
        c.estimate.append(est)
        c.low.append(low)
        c.high.append(high)
    return c


def pass_at_k_curves(run: RunData, benchmark: str) -> dict[str, list[Curve]]:
    """Per arm (in ``run.arms`` order): the "starting model", "after SFT" (arms with SFT only) and "after RL"
    curves of ``benchmark``. Curves without a record or per-problem samples are left out, and so are arms
    without any curve."""
    # the starting model is the same for every arm: bootstrap it once
    start = _curve(run, "starting model", layout.BEFORE_SFT.name, run.seed_base_records(benchmark))
    out = {}
    for arm in run.arms:
        curves = [start]
        if run.sft_steps.get(arm, 0) > 0:
            curves.append(_curve(run, "after SFT", layout.AFTER_SFT.name,
                                 run.seed_records(arm, layout.AFTER_SFT.name, benchmark)))
        curves.append(_curve(run, "after RL", layout.AFTER_RL.name,
                             run.seed_records(arm, layout.AFTER_RL.name, benchmark)))
        curves = [c for c in curves if c is not None]
        if curves:
            out[arm] = curves
    return out


# --- rendering ---------------------------------------------------------------------------------------


def _new_figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _figure():
    fig = _new_figure(FIGSIZE)
    return fig, fig.add_subplot()


def _boundaries(ax, run: RunData, colours: dict[str, str], arms: list[str]) -> None:
    """A dashed vertical line where each arm's SFT ends and its RL starts (arms sharing it share one line)."""
    groups: dict[int, list[str]] = {}
    for arm in arms:
        b = run.sft_steps.get(arm, 0)
        if b > 0:
            groups.setdefault(b, []).append(arm)
    for b, group in sorted(groups.items()):
        colour = colours[group[0]] if len(group) == 1 else "#555555"
        ax.axvline(b, color=colour, linestyle="--", linewidth=1.0, alpha=0.8,
                   label=f"SFT \u2192 RL ({', '.join(group)})")


def _finish(fig, ax, title: str, ylabel: str, subtitle: str, path: Path, empty: bool, handles=None) -> Path:
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    ax.set_xlabel("step on one timeline: SFT steps, then RL steps (RL step s at x = SFT steps + s)", fontsize=9)
    ax.set_ylabel(ylabel)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(True, alpha=0.3)
    if empty:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="#888888",
                fontsize=14)
    else:
        ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.85)
    fig.savefig(path, dpi=DPI)
    return path


def _markers(n: int) -> dict:
    return {"marker": "o", "markersize": 3} if n <= 60 else {}


def plot_timeline(run: RunData, sft_key: str | None, rl_key: str | None, path: Path, title: str, ylabel: str,
                  subtitle: str = "", colours: dict[str, str] | None = None) -> Path:
    colours = colours or arm_colours(run.arms)
    series = timeline_series(run, sft_key, rl_key)
    fig, ax = _figure()
    for arm, s in series.items():
        # SFT and RL measure on different data: two segments, not one line across the boundary
        label = arm
        for lo, hi in ((0, s.n_sft), (s.n_sft, len(s))):
            if hi > lo:
                ax.plot(s.x[lo:hi], s.y[lo:hi], color=colours[arm], linewidth=1.6, label=label, **_markers(len(s)))
                label = "_nolegend_"
    _boundaries(ax, run, colours, list(series) or run.arms)
    ax.set_xlim(left=0)
    if run.num_seeds > 1:
        subtitle = "; ".join(x for x in (subtitle, f"mean over {run.num_seeds} seeds") if x)
    return _finish(fig, ax, title, ylabel, subtitle, path, empty=not series)


def plot_pass_at_k(run: RunData, path: Path, colours: dict[str, str] | None = None) -> Path:
    from matplotlib.lines import Line2D

    colours = colours or arm_colours(run.arms)
    k = run.k or 1
    p1, pk = eval_series(run, 1), eval_series(run, k)
    fig, ax = _figure()
    handles = []
    for arm in run.arms:
        if arm not in p1 and arm not in pk:
            continue
        c = colours[arm]
        if arm in p1:
            ax.plot(p1[arm].x, [100 * v for v in p1[arm].y], color=c, linestyle="-", marker="o", markersize=5)
        if arm in pk and k != 1:
            ax.plot(pk[arm].x, [100 * v for v in pk[arm].y], color=c, linestyle="--", marker="s", markersize=4)
        handles.append(Line2D([], [], color=c, linewidth=2, label=arm))
    arms = [a for a in run.arms if a in p1 or a in pk]
    _boundaries(ax, run, colours, arms)
    handles += [h for h in ax.get_lines() if h.get_label().startswith("SFT \u2192 RL")]
    handles.append(Line2D([], [], color="black", linestyle="-", marker="o", label="pass@1"))
    if k != 1:
        handles.append(Line2D([], [], color="black", linestyle="--", marker="s", label=f"pass@{k}"))
    ax.set_xlim(left=-0.5)
    benches = ", ".join(run.benchmarks) or "the benchmarks"
    seeds = f" and {run.num_seeds} seeds" if run.num_seeds > 1 else ""
    subtitle = f"mean over {benches}{seeds}; points: before_sft, after_sft, rl_step_N, after_rl"
    title = (f"pass@1 (solid) and pass@{k} (dashed), n = {run.eval_n or k} samples" if run.k
             else "pass@1 and pass@n")
    return _finish(fig, ax, title, "percent", subtitle, path, empty=not arms, handles=handles)


_START_COLOUR = "#111111"  # black: the arm called base is grey
_CURVE_STYLES = {  # label -> (line style, marker); after SFT / after RL take the arm's colour
    "starting model": (":", "o"),
    "after SFT": ("--", "s"),
    "after RL": ("-", "^"),
}


def _k_ticks(ks: list[int]) -> list[int]:
    """Powers of two up to the largest k, and the largest k itself."""
    n = max(ks)
    return sorted({2 ** i for i in range(n.bit_length())} | {n})


def plot_pass_at_k_curves(run: RunData, benchmark: str, path: Path, colours: dict[str, str] | None = None) -> Path:
    """pass@k against k for ``benchmark``: one panel per arm (shared y axis), bootstrap bands around each curve."""
    from matplotlib.ticker import NullLocator

    colours = colours or arm_colours(run.arms)
    curves = pass_at_k_curves(run, benchmark)
    panels = list(curves) or [None]
    fig = _new_figure((max(6.0, 3.6 * len(panels)), 4.4))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, arm in zip(axes, panels):
        ax.set_ylim(-2, 102)  # a margin so lines at 0% or 100% stay visible
        ax.grid(True, alpha=0.3)
        if arm is None:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="#888888",
                    fontsize=14)
            ax.set_xticks([])  # no ks to show
            continue
        ticks = _k_ticks([k for c in curves[arm] for k in c.ks])
        for c in curves[arm]:
            colour = _START_COLOUR if c.label == "starting model" else colours[arm]
            linestyle, marker = _CURVE_STYLES[c.label]
            # with many ks, markers only where the ticks are: the line alone shows the rest
            markevery = None if len(c.ks) <= 16 else [i for i, k in enumerate(c.ks) if k in ticks]
            ax.plot(c.ks, [100 * v for v in c.estimate], color=colour, linestyle=linestyle, linewidth=1.6,
                    marker=marker, markersize=4, markevery=markevery, label=c.label)
            if all(math.isfinite(v) for v in c.low + c.high):
                ax.fill_between(c.ks, [100 * v for v in c.low], [100 * v for v in c.high], color=colour,
                                alpha=0.15, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.xaxis.set_minor_locator(NullLocator())  # log-scale minor ticks would sit between the ks
        ax.set_title(arm, color=colours[arm], fontsize=11)
        ax.set_xlabel("k (log2 scale)", fontsize=9)
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    axes[0].set_ylabel("pass@k (percent)")
    all_curves = [c for cs in curves.values() for c in cs]
    detail = ""
    if all_curves:  # evaluations could differ in n or problems: show every value found
        ns = "/".join(str(n) for n in sorted({max(c.ks) for c in all_curves}))
        problems = "/".join(str(p) for p in sorted({c.num_problems for c in all_curves}))
        detail = f" (n = {ns} samples, {problems} problems)"
    over = f"{run.num_seeds} seeds, then problems" if run.num_seeds > 1 else "problems"
    fig.suptitle(f"pass@k against k: {benchmark}{detail}\nbands: {100 * run.level:g}% percentile bootstrap over "
                 f"{over}", fontsize=11)
    fig.savefig(path, dpi=DPI)
    return path


def write_plots(run: RunData, out_dir: Path) -> dict[str, Path]:
    """entropy.png, kl.png, reward.png, pass_at_k.png and one pass_at_k_curves_<benchmark>.png per benchmark in
    ``out_dir``; returns name -> path."""
    colours = arm_colours(run.arms)
    out_dir = Path(out_dir)
    plots = {
        "entropy": plot_timeline(run, "entropy_mean", "entropy", out_dir / "entropy.png", "Mean token entropy",
                                 "entropy (nats)", "SFT: on the SFT data (entropy_mean); RL: on its own samples "
                                 "(entropy)", colours),
        "kl": plot_timeline(run, "kl_mean", "kl", out_dir / "kl.png", "KL to the base model", "KL (nats/token)",
                            "SFT: on the SFT data (kl_mean); RL: k3 estimate on its own samples (kl)", colours),
        "reward": plot_timeline(run, None, "reward_mean", out_dir / "reward.png", "GRPO reward", "mean reward",
                                "RL only (reward_mean per step); x is offset by each arm's SFT steps", colours),
        "pass_at_k": plot_pass_at_k(run, out_dir / "pass_at_k.png", colours),
    }
    for b in run.benchmarks:
        name = f"pass_at_k_curves_{layout.benchmark_filename(b)[:-5]}.png"  # [:-5]: without ".json"
        plots[f"pass_at_k_curves:{b}"] = plot_pass_at_k_curves(run, b, out_dir / name, colours)
    return plots
