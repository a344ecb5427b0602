"""The equal-budget comparison grid of Huang et al. 2017 (Snapshot Ensembles, Tables 1 and 3) as data.

A config names ``networks`` x ``datasets`` with a ``budgets[dataset][network] = (epochs, M)`` table, the
Table 1 ``columns`` and the ``extras`` to run, and the ``table3_ms`` (DenseNet-40, CIFAR-100, a0 = 0.2).
:func:`grid` turns it into :class:`GridCell` s, :func:`method_rows` lists a cell's table rows, and
:func:`paper_values` keys our mean errors by the paper's cells (:mod:`mergejax.papers.snapshot`);
:func:`cell_table` and :func:`comparison_plots` draw the report; :func:`report_cells` assembles it.
``experiments/snapshot_ensemble.py`` trains the runs (:func:`mergejax.ensembles.swa.training_runs`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from mergejax import papers, report
from mergejax.config import replace, to_dict
from mergejax.core import data as data_lib
from mergejax.core.models import make_model
from mergejax.ensembles.swa import training_runs
from mergejax.papers import snapshot as paper
from mergejax.papers import swa_fge
from mergejax.papers.resnet import shortcut_of


class GridCell(NamedTuple):
    """One network x dataset (x M): where its units live (``prefix``), its training config, M and methods."""

    prefix: str
    train: ml_collections.ConfigDict
    M: int
    methods: tuple  # columns + extras, spelled as in the config ('snapshot_a0.2')
    table1: bool = True  # M is the paper's budget M (False: a Table 3 cell with another M)


def alpha0s(methods) -> tuple[float, ...]:
    """The restart learning rates of the ``snapshot_a<a0>`` methods."""
    return tuple(float(m[len("snapshot_a"):]) for m in methods if m.startswith("snapshot_a"))


def dropout_column(network: str, dataset: str) -> bool:
    """Whether ``network`` on ``dataset`` has a Dropout column: for the paper's networks where Table 1 prints one
    (not ResNet-110), for others where the model has a ``dropout`` option."""
    if network in paper.NETWORKS:
        return paper.table1_key(network, dataset, "dropout") in {c.key for c in paper.CELLS}
    return "dropout" in {f.name for f in dataclasses.fields(make_model(network, 10))}


def grid(config) -> list[GridCell]:
    """The cells ``config`` runs: ``networks`` x ``datasets`` that have a ``budgets`` entry ``(epochs, M[, batch])``
    (all when ``budgets`` is empty; none given: ``config.train`` alone, units directly under ``seed<k>/``), then one
    Table 3 cell per M of ``table3_ms``, merged into the Table 1 cell when M is its budget's M. ``num_snapshots`` > 0
    overrides every M; ``batch`` (default ``config.train.batch_size``) is the cell's batch size. ``network_kwargs``
    (network -> model kwargs, optional) are merged over ``config.train.model_kwargs``; ``train_splits`` (dataset ->
    training split, optional, e.g. ``"train+extra"``) sets the cell's ``train_split``."""
    methods = tuple(config.columns) + tuple(config.extras)
    if not (config.networks or config.datasets or config.table3_ms):
        return [GridCell("", config.train, config.num_snapshots, methods)]

    def cell(net, ds, methods, m=None):
        epochs, m0, *batch = config.budgets[ds][net] if net in config.budgets.get(ds, {}) else (config.train.epochs, 0)
        m0 = config.num_snapshots or m0
        m = m or m0
        kwargs = {**to_dict(config.train.model_kwargs), **to_dict(config.get("network_kwargs", {}).get(net, {}))}
        train = replace(config.train, model=net, dataset=ds, epochs=float(epochs), augment=config.train.augment and ds not in
                        config.no_augment, batch_size=int(batch[0]) if batch else config.train.batch_size, model_kwargs=kwargs,
                        train_split=config.get("train_splits", {}).get(ds, config.train.train_split))
        methods = tuple(x for x in methods if x != "dropout" or dropout_column(net, ds))
        return GridCell(f"{net}/{ds}/" + ("" if m == m0 else f"M{m}/"), train, m, methods, m == m0)

    cells = {}
    for ds in config.datasets or (config.train.dataset,):
        for net in config.networks or (config.train.model,):
            if not config.budgets or net in config.budgets.get(ds, {}):  # no budget: not in the paper (DenseNet-100 on SVHN)
                c = cell(net, ds, methods)
                cells[c.prefix] = c
    for m in config.table3_ms:
        c = cell("densenet40", "cifar100", ("snapshot_a0.2",), m)
        old = cells.get(c.prefix, c._replace(methods=()))
        cells[c.prefix] = old._replace(methods=old.methods + tuple(x for x in c.methods if x not in old.methods))
    return list(cells.values())


def cell_data(config, cell: GridCell) -> tuple[data_lib.Split, data_lib.Split]:
    """``(train, test)`` of ``cell``: its ``train_split`` less ``config.holdout[dataset]`` examples withheld
    (:func:`mergejax.core.data.holdout`, seed 0; the withheld part is never used), and the test split."""
    ds, train = cell.train.dataset, data_lib.load_train(cell.train.dataset, cell.train.get("train_split", "train"))
    n = config.get("holdout", {}).get(ds, 0)
    return (data_lib.holdout(train, n)[0] if n else train), data_lib.load(ds, "test")


def method_rows(cell: GridCell, dropout: float) -> list[tuple[str, str, int]]:
    """``(summary key, label, training budgets)`` of the rows ``cell`` reports, in table order."""
    a0s, want, M = alpha0s(cell.methods), set(cell.methods), cell.M
    rows = [("single", "Single model (step schedule)", 1), ("nocycle", "NoCycle snapshot ensemble", 1),
            ("single_cycle", "Single-Cycle ensemble", 1), ("dropout", f"Single model, dropout {dropout}", 1),
            *[(f"snapshot_{a}", f"Snapshot ensemble a0={a}", 1) for a in a0s],
            *[(f"weight_average_{a}", f"Weight average of the snapshots a0={a}", 1) for a in a0s if "weight_average" in want],
            ("swa_final_sgd", "SWA run, last iterate", 1), ("swa", "SWA (BN re-estimated)", 1), ("fge", "FGE", 1),
            ("true_ensemble", "True ensemble", M), ("long_teacher", f"Single model of {M} budgets", M)]
    keep = want | {"swa_final_sgd"} if "swa" in want else want
    return [r for r in rows if r[0] in keep or r[0].startswith(("snapshot_", "weight_average_"))]


def paper_values(cells_summaries, table3_ms=()) -> dict[tuple[str, str, str], float]:
    """``{paper cell key: our mean test error %}`` from ``[(GridCell, summary)]``: Table 1 for cells at the paper's
    M, Table 3 for the DenseNet-40 / CIFAR-100 a0 = 0.2 ensembles whose M is in ``table3_ms``."""
    ours = {}
    for c, summary in cells_summaries:
        net, ds = c.train.model, c.train.dataset
        for key, s in summary.items():
            if c.table1 and (k := paper.table1_key(net, ds, key)) is not None:
                ours[k] = s["error_pct"]["mean"]
        if (net, ds) == ("densenet40", "cifar100") and c.M in table3_ms and "snapshot_0.2" in summary:
            ours[paper.table3_key(c.M)] = summary["snapshot_0.2"]["error_pct"]["mean"]
    return ours


def paper_deviations(done: list[dict], table3_ms=()) -> dict[tuple[str, str, str], list[str]]:
    """``{paper cell key: ["M=2 (paper 5)", ...]}``: how each compared cell's run differs from the paper's setting
    (:func:`mergejax.papers.snapshot.setting`): budget in epochs actually run (``budget_steps / steps_per_epoch``),
    M, batch size, weight decay, model kwargs (width, depth, ...), augmentation, ResNet shortcut. ``done``: as
    :func:`report_cells`'."""
    out = {}
    for r in done:
        c = r["cell"]
        kw = to_dict(c.train.model_kwargs)
        ours = {"epochs": r["budget_steps"] / r["steps_per_epoch"], "M": c.M, "batch_size": c.train.batch_size,
                "weight_decay": c.train.weight_decay, "model_kwargs": papers.arch_kwargs(kw, "shortcut"),
                "augment": c.train.augment, "shortcut": shortcut_of(c.train.model, kw)}
        for key in paper_values([(c, r["summary"])], table3_ms):
            out[key] = papers.deviations(ours, paper.setting(key))
    return out


def _fmt(s: dict, digits: int = 2) -> str:  # report.fmt_mean_std of a summary
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def cell_table(cell: GridCell, summary: dict, rows, seeds, total: int, per_epoch: int, num_test: int) -> str:
    """Markdown table of one cell: per row of :func:`method_rows`, the budgets, members, soft-average
    error %, NLL, hard-vote error % and the last member alone (mean ± std over ``seeds``; ``summary``:
    key -> :func:`mergejax.ensembles.snapshot.curve_summary`), and whether each snapshot ensemble
    beats the single model at equal cost (``total`` steps, ``per_epoch`` steps per epoch)."""
    cfg = cell.train
    table_rows = [{"method": label, "budgets": cost_, "members": (x := summary[key])["members"],
                   "test error % (soft avg)": _fmt(x["error_pct"]), "NLL": _fmt(x["nll"], 3),
                   "hard-vote error %": _fmt(x["vote_error_pct"]) if x["members"] > 1 else "",
                   "last member alone %": _fmt(x["error_vs_m_pct"][0])} for key, label, cost_ in rows]
    table = (f"`{cfg.model}` ({dict(cfg.model_kwargs)}) on `{cfg.dataset}`, budget B = {total} steps "
             f"({total / per_epoch:.1f} epochs, batch {cfg.batch_size}), M = {cell.M}; mean ± std over seeds "
             f"{list(seeds)}; test set of {num_test} examples. Ensembles average softmax outputs of their members.\n\n"
             + report.markdown_table(table_rows))
    err = {a: summary[f"snapshot_{a}"]["error_pct"] for a in alpha0s(cell.methods)}
    if err and "single" in summary:
        best, single = min(err, key=lambda a: err[a]["mean"]), summary["single"]["error_pct"]
        verdicts = ", ".join(f"a0 = {a}: {'beats' if err[a]['mean'] < single['mean'] else 'does not beat'}" for a in err)
        table += (f"\nSnapshot ensemble (best a0 = {best}): {err[best]['mean']:.2f} ± {err[best]['std']:.2f} % vs single model "
                  f"{single['mean']:.2f} ± {single['std']:.2f} % at equal cost ({verdicts} the single model on the mean).\n")
    return table


def comparison_plots(out_dir: str, sched: dict, losses: dict, summary: dict, rows, runs, M: int, total: int) -> list[str]:
    """``lr_schedules.png`` (every trained schedule in ``runs``), ``train_loss.png`` (``losses``: label
    -> train records) and ``error_vs_m.png`` (error of the last m members, mean over seeds)."""
    t = np.arange(total)
    vs_m = lambda p: ([1, M], [p[0]["mean"]] * 2) if len(p) == 1 else (list(range(1, len(p) + 1)), [x["mean"] for x in p])  # noqa: E731
    return [report.plot_curves(os.path.join(out_dir, "lr_schedules.png"), {k: (t + 1, np.asarray(jax.vmap(v.lr_fn)(t))) for k, v in
                               sched.items() if k == "single" or k in runs and not k.startswith("single_cycle")},
                               xlabel="iteration t", ylabel="learning rate"),
            report.plot_curves(os.path.join(out_dir, "train_loss.png"), {k: ([h["step"] for h in v], [h["loss"] for h in v])
                               for k, v in losses.items()}, xlabel="step", ylabel="training loss (first seed)", logy=True),
            report.plot_curves(os.path.join(out_dir, "error_vs_m.png"), {lab: vs_m(summary[k]["error_vs_m_pct"])
                               for k, lab, _ in rows}, xlabel="m (ensemble of the last m members)", ylabel="test error % (mean over seeds)")]


def report_cells(config, done: list[dict], out_dir: str) -> tuple[dict, str, list[str]]:
    """results.json fields, the Markdown table and the plots of finished grid cells.

    ``done``: per cell (in :func:`grid` order) ``{cell, budget_steps, steps_per_epoch, summary, rows, sched, table, runs,
    snapshot_boundaries}``, ``runs[seed]`` holding ``curves``, ``losses`` and ``wall_time_s``. The top level of the
    results is the first cell (with ``cells`` per cell when there are several); the plots are of the first cell's first
    seed; ``paper_comparison`` puts our errors beside every published cell (:func:`mergejax.papers.side_by_side`), each
    with its run's ``deviations`` from the paper's setting (:func:`paper_deviations`), and lists the SWA / FGE
    reference points under ``not_run_reasons``."""
    first, published = done[0], papers.cells("snapshot", "table1") + (papers.cells("snapshot", "table3") if config.table3_ms else ())
    comparison = papers.side_by_side(published, paper_values([(r["cell"], r["summary"]) for r in done], tuple(config.table3_ms)),
                                     paper_deviations(done, tuple(config.table3_ms)))
    comparison = papers.also_not_run(comparison, papers.cells("swa_fge"), swa_fge.NOT_RUN)
    M, total = first["cell"].M, first["budget_steps"]
    table = ("\n".join(f"### `{r['cell'].prefix.rstrip('/')}`\n\n{r['table']}" for r in done) if len(done) > 1 else first["table"])
    table += "\n" + papers.markdown(comparison)
    plots = comparison_plots(out_dir, first["sched"], first["runs"][config.seeds[0]]["losses"], first["summary"], first["rows"],
                             training_runs(first["cell"].methods, total, M), M, total)
    keep = lambda r: {"budget_steps": r["budget_steps"], "steps_per_epoch": r["steps_per_epoch"], "summary": r["summary"],  # noqa: E731
                      "runs": {str(s): {k: v for k, v in x.items() if k != "losses"} for s, x in r["runs"].items()},
                      "snapshot_boundaries": r["snapshot_boundaries"]}
    results = {"config": to_dict(config), **keep(first), "plots": [os.path.basename(p) for p in plots],
               "wall_time_s": sum(x["wall_time_s"] for r in done for x in r["runs"].values()),  # wall: all units
               "device_kind": jax.devices()[0].device_kind, "paper_comparison": comparison,
               **({"cells": {r["cell"].prefix.rstrip("/"): keep(r) for r in done}} if len(done) > 1 else {})}
    return results, table, plots
