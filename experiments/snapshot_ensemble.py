"""Snapshot Ensembles (Huang et al. 2017, Tables 1 and 3) beside SWA and FGE at equal training cost B, M members;
``experiments/snapshot_ensemble.py [--preset paper] [--set networks="('resnet110',)" --set columns="('single','snapshot_a0.2')"]``.
Per network x dataset x seed (:func:`mergejax.ensembles.swa.training_runs`): the Table 1 ``columns`` (single model, NoCycle,
Single-Cycle, dropout, snapshot ensembles per a0) and ``extras`` (true ensemble, SWA and its last iterate, FGE, a single model of
M budgets, weight average of the snapshots). ``table3_ms``: DenseNet-40 on CIFAR-100, a0 = 0.2, M cycles. Units
``units/[<net>/<dataset>/]seed<k>/<run>`` train one model each (checkpointed, snapshots on disk; each batch split over the
``devices``); ensembles read other units' final models. ``models_per_program`` != 1 (0 = auto: 1 on CPU): members of one
schedule (true ensemble 1..M-1, equal single-cycle runs) as one vmapped program spread over the devices, unit ``<run>-<first>..<last>``
(final models in its ``<member>/``). results.json["paper_comparison"]: our errors beside the published cells."""

from __future__ import annotations

import os
import sys
import time

from mergejax import report
from mergejax.averaging.parallel import resolve_devices
from mergejax.config import to_dict
from mergejax.core import checkpoint, multi, optim as schedules
from mergejax.core.train import model_apply_fn
from mergejax.ensembles.comparison import GridCell, alpha0s, cell_data, cell_table, grid, method_rows, report_cells
from mergejax.ensembles.snapshot import curve_summary, ensemble_curve, final_snapshot, fit_with_snapshots
from mergejax.ensembles.swa import (budget_step, equal_budget_plans, fge_cycle_steps, plan_state, swa_model,
                                    training_runs, weight_average_model)
from mergejax.experiment import config_file, experiment_main, unit
from mergejax.run import model_of, num_steps, seed_groups

NAME, ORDER = "snapshot_ensemble", 20
CONFIG = config_file(__file__)  # configs/snapshot_ensemble.py
PRESETS, get_config, plan = CONFIG.PRESETS, CONFIG.get_config, CONFIG.plan


def run_seed(config, cell: GridCell, data, out_dir: str, seed: int, total: int, sched: dict, progress: bool) -> dict:
    (train, test), cfg, M, t0, units, finals, stored = data, cell.train, cell.M, time.perf_counter(), {}, {}, {}
    want, a0s = set(cell.methods), alpha0s(cell.methods)
    runs = training_runs(want, total, M, a0s)
    models = {k: model_of(cfg, train.num_classes, **kw) for k, kw in
              (("", {}), ("dropout", {"dropout": config.dropout})) if k in ("", *runs)}
    udir, shape, gpath = os.path.join(out_dir, "units", f"{cell.prefix}seed{seed}"), train.images.shape[1:], os.path.join(out_dir, "groups.json")
    ucfg = lambda **deps: {"train": to_dict(cfg), "eval_batch_size": config.eval_batch_size, "seed": seed,  # noqa: E731
                           "num_snapshots": M, **deps}

    def do(name, deps, fn):
        units[name] = unit(out_dir, f"{cell.prefix}seed{seed}/{name}", ucfg(**deps), fn)
        if progress:
            print(f"  {cell.prefix}seed {seed}: {name} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    fit_kw = {"devices": resolve_devices(cfg.devices, cfg.batch_size), **{k: cfg[k] for k in ("batch_size", "log_every", "remainder",
              "checkpoint_every")}}  # devices: each batch split over them (a run), or the members spread (a vmapped group)

    def train_run(name, run_seed, deps, schedule=None, marks=None, curves={}):  # noqa: B006 (read only)
        plan, model = sched[schedule or name], models.get(name, models[""])

        def fn(workdir):
            state, snaps, records = fit_with_snapshots(plan_state(plan, model, run_seed, shape, cfg), train, plan.marks if marks
                                                       is None else marks, workdir, num_steps=plan.num_steps, seed=run_seed,
                                                       progress=False, manifest=ucfg(**deps), **fit_kw)
            finals[name] = {"params": state.params, "batch_stats": state.batch_stats}  # for the ensemble units below
            t1, losses = time.perf_counter(), [r for r in records if r["split"] == "train"]
            out = {k: ensemble_curve(state.apply_fn, pick(state, snaps), test, config.eval_batch_size) for k, pick in curves.items()}
            return {"curves": out, "losses": losses, "wall_time_s": losses[-1]["time_s"] + time.perf_counter() - t1}
        do(name, deps, fn)

    def members(base, js, seed_of, deps_of, plan_of, marks=None):  # base-<j>: vmapped groups of one schedule, or one by one
        same = len(js) > 1 and len({sched[plan_of(j)] for j in js}) == 1
        for g in seed_groups(cfg, js, config.models_per_program, pin=(gpath, f"{cell.prefix}seed{seed}/{base}")) if same else [[j] for j in js]:
            if len(g) == 1:
                train_run(f"{base}-{g[0]}", seed_of(g[0]), deps_of(g[0]), plan_of(g[0]), marks=marks)
                continue
            names, name, plan = [f"{base}-{j}" for j in g], f"{base}-{g[0]}..{g[-1]}", sched[plan_of(g[0])]
            stored.update({n: os.path.join(udir, name, n) for n in names})

            def fn(wd, g=g, names=names, plan=plan):
                out, wall = multi.fit_members([plan_state(plan, models[""], seed_of(j), shape, cfg) for j in g], train, wd, names,
                                              num_steps=plan.num_steps, seeds=[seed_of(j) for j in g], progress=False,
                                              manifest=ucfg(**deps_of(g[0])), **fit_kw)
                finals.update(out)
                return {"curves": {}, "wall_time_s": wall}
            do(name, {**deps_of(g[0]), "members": names}, fn)

    def ensemble(name, members, deps):  # final models of other units: in memory if trained in this process
        load = lambda m: checkpoint.load(stored[m]) if m in stored else final_snapshot(os.path.join(udir, m))  # noqa: E731

        def fn(workdir):
            t1, snaps = time.perf_counter(), [finals.pop(m, None) or load(m) for m in members]
            curve = ensemble_curve(model_apply_fn(models[""]), snaps, test, config.eval_batch_size)
            return {"curves": {name: curve}, "wall_time_s": time.perf_counter() - t1}
        do(name, deps, fn)

    last = lambda st, sn: sn[-1:]  # noqa: E731
    if "single-0" in runs:
        train_run("single-0", 1000 * seed, {"member": 0}, "single", curves={"single": last, "nocycle": lambda st, sn: sn})
    if "true_ensemble" in want:
        members("single", range(1, M), lambda j: 1000 * seed + j, lambda j: {"member": j}, lambda j: "single", marks=(total,))
        ensemble("true_ensemble", [f"single-{j}" for j in range(M)], {})
    if "single_cycle" in want:
        members("single_cycle", range(M), lambda j: 1000 * seed + 100 + j, lambda j: {"single_cycle_alpha0": config.single_cycle_alpha0,
                "member": j}, lambda j: f"single_cycle-{j}")
        ensemble("single_cycle", [f"single_cycle-{j}" for j in range(M)], {"single_cycle_alpha0": config.single_cycle_alpha0})
    if "dropout" in runs:
        train_run("dropout", 1000 * seed, {"dropout": config.dropout}, "single", curves={"dropout": last})
    wavg = lambda st, sn: [weight_average_model(st, sn, train, cfg.batch_size, seed=seed)]  # noqa: E731
    for a in a0s:
        train_run(f"snapshot_{a}", 1000 * seed, {"alpha0": a, **({"weight_average": True} if "weight_average" in want else {})},
                  curves={f"snapshot_{a}": lambda st, sn: sn, **({f"weight_average_{a}": wavg} if "weight_average" in want else {})})
    if "swa" in want:  # swa_final_sgd: its last iterate
        train_run("swa", 1000 * seed, {k: config[k] for k in ("swa_lr", "swa_start")}, marks=(), curves={
            "swa": lambda st, sn: [swa_model(st, train, cfg.batch_size, seed=seed)], "swa_final_sgd": lambda *_: [finals["swa"]]})
    if "fge" in want:
        train_run("fge", 1000 * seed, {k: config[k] for k in ("fge_start", "fge_alpha1", "fge_alpha2")}, curves={"fge": lambda st, sn: sn})
    if "long_teacher" in want:
        train_run("long_teacher", 1000 * seed + 300, {"budgets": M}, curves={"long_teacher": last})
    losses = {"single": "single-0", **{f"snapshot a0={a}": f"snapshot_{a}" for a in a0s}, "SWA": "swa", "FGE": "fge"}
    return {"curves": {k: v for u in units.values() for k, v in u["curves"].items()},
            "losses": {label: units[name]["losses"] for label, name in losses.items() if name in units},
            **({"fge_boundaries": list(sched["fge"].marks), "fge_cycle_steps": fge_cycle_steps(budget_step(config.fge_start, total),
                total, M)} if "fge" in want else {}),
            **({"swa_start": budget_step(config.swa_start, total)} if "swa" in want else {}),
            "wall_time_s": sum(u["wall_time_s"] for u in units.values())}


def run_cell(config, cell: GridCell, data, out_dir: str, progress: bool) -> dict:
    """Every seed of one grid cell: its summary per method, runs, schedules and Markdown table."""
    (train, test), M, cfg = data, cell.M, cell.train
    total, per_epoch = num_steps(cfg, len(train))
    sched = equal_budget_plans(total, per_epoch, M, cfg.lr, alpha0s=alpha0s(cell.methods), **{k: config[k] for k in (
        "single_cycle_alpha0", "swa_lr", "swa_start", "fge_start", "fge_alpha1", "fge_alpha2")})
    runs = {seed: run_seed(config, cell, data, out_dir, seed, total, sched, progress) for seed in config.seeds}
    rows = method_rows(cell, config.dropout)
    summary = {key: curve_summary([runs[s]["curves"][key] for s in config.seeds]) for key, _, _ in rows}
    table = cell_table(cell, summary, rows, config.seeds, total, per_epoch, len(test))
    return {"budget_steps": total, "steps_per_epoch": per_epoch, "summary": summary, "rows": rows, "sched": sched, "table": table,
            "runs": runs, "snapshot_boundaries": list(schedules.snapshot_boundaries(total, M)), "cell": cell}


def run(config, out_dir: str, progress: bool = True) -> dict:
    loaded, done = {}, []
    for cell in grid(config):
        key = (cell.train.dataset, cell.train.train_split)  # train: train_split less config.holdout (cell_data)
        data = loaded[key] if key in loaded else loaded.setdefault(key, cell_data(config, cell))
        done.append(run_cell(config, cell, data, out_dir, progress))
    fields, table, plots = report_cells(config, done, out_dir)
    results = {"experiment": NAME, **fields}
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": plots}


def main(argv=None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
