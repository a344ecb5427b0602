"""Writing experiment outputs: ``results.json``, Markdown tables and PNG plots."""

from __future__ import annotations

import math
import os
import statistics
from typing import Sequence

import numpy as np

from mergejax.core.rundir import write_json  # noqa: F401  (one JSON writer: atomic, NaN -> null)


def write_outputs(out_dir: str, results: dict, table: str) -> None:
    """An experiment's two text outputs: ``out_dir/results.json`` and ``out_dir/table.md``."""
    write_json(os.path.join(out_dir, "results.json"), results)
    tmp = os.path.join(out_dir, f"table.md.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(table)
    os.replace(tmp, os.path.join(out_dir, "table.md"))


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".4f") -> str:
    """A GitHub Markdown table of ``rows`` (dicts); columns default to the first row's keys."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def mean_std(values: Sequence[float]) -> dict:
    """``{'mean', 'std', 'n'}`` (sample std; 0 for a single value)."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def fmt_mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    s = mean_std([v * scale for v in values])
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> str:
    """Lay out, save ``fig`` to ``path`` (PNG, 120 dpi; parent directories created), close it."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_curves(path: str, curves: dict[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str, title: str = "", logy: bool = False) -> str:
    """Save a line plot of ``{label: (xs, ys)}`` to ``path`` (PNG)."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(curves) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_points(path: str, runs: Sequence[dict], keys: Sequence[str], *, ylabel: str, title: str = "",
                off_scale: float | None = None) -> str:
    """Mean ± sample std (error bars) and every run (grey dots) of ``run[key]`` per key, one
    column per key. With ``off_scale``, keys whose mean is more than that below the best are
    left out and named in a note (e.g. a naive weight average at chance level)."""
    plt = pyplot()
    mean = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    off = [k for k in keys if off_scale is not None and mean[k] < max(mean.values()) - off_scale]
    shown = [k for k in keys if k not in off]
    fig, ax = plt.subplots(figsize=(7, 4))
    stds = [float(np.std([r[k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0 for k in shown]
    ax.errorbar(range(len(shown)), [mean[k] for k in shown], yerr=stds, fmt="o", capsize=4)
    for i, k in enumerate(shown):
        ax.scatter([i] * len(runs), [r[k] for r in runs], s=8, alpha=0.5, color="gray")
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels(shown, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if off:
        ax.text(0.01, 0.02, "off scale: " + ", ".join(f"{k} {mean[k]:.3f}" for k in off), transform=ax.transAxes, fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
