"""A FreezeOut sweep: (t0, spacing, scaled) points timed between no-freeze baselines, and its report.

A point is ``(t0, spacing, scaled)``; :data:`mergejax.freezeout.BASELINE` freezes nothing.
:func:`timing_sequence` interleaves baselines with the points, :func:`compare_with_baselines`
turns each run's times into savings against the baselines timed near it, and :func:`rows`,
:func:`table` and :func:`plot` draw the report from the runs (dicts of
:func:`mergejax.freezeout.train_and_evaluate` plus ``label``, ``unit``, ``resumed``).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from mergejax import report
from mergejax.freezeout import BASELINE

# (spacing, scaled) -> (colour, marker) in the plots
STYLES = {("linear", True): ("tab:blue", "o"), ("linear", False): ("tab:cyan", "s"), ("cubic", True): ("tab:red", "^"),
          ("cubic", False): ("tab:orange", "v"), ("squared", True): ("tab:green", "D"), ("squared", False): ("tab:olive", "d")}


def points(t0s: Sequence[float], spacings: Sequence[str], scalings: Sequence[bool], baseline_every: int = 4) -> list[tuple]:
    """Every ``(t0, spacing, scaled)`` of the grid, in :func:`timing_sequence` order."""
    return timing_sequence([(t0, sp, sc) for t0 in t0s for sp in spacings for sc in scalings], baseline_every)


def point_label(point: tuple) -> str:
    """``'baseline'`` or ``'t0=0.8 cubic scaled'`` for a sweep point ``(t0, spacing, scaled)``."""
    t0, spacing, scaled = point
    return "baseline" if tuple(point) == BASELINE else f"t0={t0} {spacing} {'scaled' if scaled else 'unscaled'}"


def point_slug(point: tuple) -> str:
    """:func:`point_label` as a path component: ``'t0_0.8-cubic-scaled'``."""
    return point_label(point).replace("=", "_").replace(" ", "-")


def timing_sequence(points: Sequence[tuple], baseline_every: int = 4) -> list[tuple]:
    """``points`` (``(t0, spacing, scaled)``) in timing order with the no-freeze :data:`BASELINE`
    first, after every ``baseline_every`` points (0: never in between) and last, so each point
    has a baseline timed near it (see :func:`compare_with_baselines`)."""
    seq = [BASELINE]
    for i, p in enumerate(points, 1):
        seq.append(tuple(p))
        if baseline_every and i % baseline_every == 0 and i < len(points):
            seq.append(BASELINE)
    return seq + [BASELINE]


def compare_with_baselines(runs: Sequence[Mapping], is_baseline: Callable[[Mapping], bool]) -> list[dict]:
    """Each run compared with the no-freeze baseline at its place in the timing sequence.

    ``runs``: dicts with ``order`` (position in the sequence), ``seed``, ``train_s``, ``cpu_s``
    and ``compile_s`` (seconds; ``train_s``/``cpu_s`` may be None). A run's reference is the
    baseline of its seed linearly interpolated between the baselines timed before and after
    it, which removes the slow drift of a shared machine's speed. Returns copies with
    ``baseline_ref_s``, ``measured_saving`` (wall), ``cpu_saving`` and
    ``measured_saving_with_compile`` (fractions; None where a time is missing).
    """
    keys = {"baseline_ref_s": lambda r: r["train_s"], "cpu": lambda r: r["cpu_s"],
            "compile": lambda r: None if r["train_s"] is None else r["train_s"] + r["compile_s"]}
    out = []
    for r in runs:
        base = [b for b in runs if is_baseline(b) and b["seed"] == r["seed"]]
        ref = {}
        for name, key in keys.items():
            known = [b for b in base if key(b) is not None]
            ref[name] = float(np.interp(r["order"], [b["order"] for b in known], [key(b) for b in known])) if known else None

        def saving(value, reference):
            return None if value is None or reference is None else 1.0 - value / reference

        out.append({**r, "baseline_ref_s": ref["baseline_ref_s"], "measured_saving": saving(r["train_s"], ref["baseline_ref_s"]),
                    "cpu_saving": saving(r["cpu_s"], ref["cpu"]),
                    "measured_saving_with_compile": saving(keys["compile"](r), ref["compile"])})
    return out


def _pct(values: list, scale: float = 100.0) -> float:  # scale x the mean of the known values (NaN if none)
    known = [v for v in values if v is not None]
    return scale * report.mean_std(known)["mean"] if known else float("nan")


def row(lab: str, rs: list[dict]) -> dict:
    """The table row of one sweep point (or the baseline) over its runs ``rs`` (seeds, savings in %)."""
    return {"config": lab, "predicted saving %": 100 * rs[0]["predicted_saving"],
            "wall-time saving %": _pct([r["measured_saving"] for r in rs]), "CPU-time saving %": _pct([r["cpu_saving"] for r in rs]),
            "wall-time incl. compile %": _pct([r["measured_saving_with_compile"] for r in rs]),
            "test acc": report.fmt_mean_std([r["test_accuracy"] for r in rs], 100.0, 2), "stages": rs[0]["stages"],
            "train time s": _pct([r["train_s"] for r in rs], 1.0), "resumed": sum(r["resumed"] for r in rs)}


def table(config, tc, runs: list[dict], rows: list[dict], total: int, evaluated_on: str, cache: str | None,
          heading: str | None = None) -> str:
    """Markdown: what was timed and how, then :func:`row` s. ``config``: the sweep config (``max_stages``,
    ``seeds``, ``repeats``, ``baseline_every``, ``validation``); ``tc``: the network's train config."""
    resumed = [r["unit"] for r in runs if r["resumed"]]  # their times cover the resumed part only
    text = (f"FreezeOut on `{tc.dataset}` with `{tc.model}` {dict(tc.model_kwargs)}, {total} steps, batch {tc.batch_size}, "
            f"alpha(0) = {tc.lr}, max_stages = {config.max_stages}, seeds {list(config.seeds)}, device {runs[0]['device_kind']}. "
            f"Saving = 1 - loop time / baseline loop time, compile excluded unless stated (min of {config.repeats} timed run(s); "
            f"baselines timed first, every {config.baseline_every} points and last, interpolated to each point's place); CPU = "
            f"process CPU time (steadier on a shared machine); 'incl. compile' adds the time to get the run's stages (compile or "
            f"persistent-cache load); predicted = from XLA cost-analysis FLOPs per compiled stage."
            + (f" Accuracy on {evaluated_on}." if config.validation else "")
            + (f" Persistent compilation cache on (`{cache}`)." if cache else "")
            + (f" **Resumed from a checkpoint (times cover the resumed part only):** {', '.join(resumed)}." if resumed else "")
            + "\n\n") + report.markdown_table(rows, floatfmt=".2f")
    return text if heading is None else f"### {heading}\n\n{text}"


def plot(path: str, runs: list[dict], title: str) -> str:
    """Accuracy against measured saving, and measured against predicted saving, per (spacing, scaled)."""
    plt = report.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    timed = [r for r in runs if r["measured_saving"] is not None]
    for (spacing, scaled), (color, marker) in STYLES.items():
        rs = [r for r in timed if r["label"] != "baseline" and (r["spacing"], r["scaled"]) == (spacing, scaled)]
        pct = lambda key, rs=rs: [100 * r[key] for r in rs]  # noqa: E731
        name = f"{spacing} {'scaled' if scaled else 'unscaled'}"
        if rs:
            ax1.scatter(pct("measured_saving"), pct("test_accuracy"), c=color, marker=marker, label=name)
            ax2.scatter(pct("predicted_saving"), pct("measured_saving"), c=color, marker=marker, label=f"{name} (wall)")
            ax2.scatter(pct("predicted_saving"), pct("cpu_saving"), facecolors="none", edgecolors=color, marker=marker,
                        label=f"{name} (CPU time)")
            for r in rs:
                ax1.annotate(f"{r['t0']}", (100 * r["measured_saving"], 100 * r["test_accuracy"]), fontsize=7)
    base = [r for r in timed if r["label"] == "baseline"]
    ax1.scatter([100 * r["measured_saving"] for r in base], [100 * r["test_accuracy"] for r in base], c="k", marker="*", s=90, label="no freeze")
    ax1.set(xlabel="measured wall-clock saving (%)", ylabel="test accuracy (%)", title=title)
    hi = max([100 * r["predicted_saving"] for r in runs] + [1.0])
    ax2.plot([0, hi], [0, hi], "k--", lw=0.8, label="measured = predicted")
    ax2.set(xlabel="predicted FLOP saving (%)", ylabel="measured saving (%)", title="cost model vs clock")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    return report.save_figure(fig, path)
