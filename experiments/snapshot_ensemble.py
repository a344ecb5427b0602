"""Snapshot Ensembles (Huang et al. 2017, Table 1) beside SWA and FGE at equal training cost B, M members;
``experiments/snapshot_ensemble.py [--preset paper] [--set num_snapshots=4 --set seeds=(0,1)]``. Rows per seed
(:func:`mergejax.ensembles.swa.equal_budget_plans`): single model, NoCycle, Single-Cycle, snapshot ensembles per a0, SWA
and its last iterate, FGE, true ensemble (M budgets). Units ``units/seed<k>/<run>`` train one model each (checkpointed,
snapshots on disk); ``true_ensemble``/``single_cycle`` evaluate other units' final members (in memory if trained here).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import ml_collections
import numpy as np

from mergejax import report
from mergejax.config import to_dict, train_config
from mergejax.core import data as data_lib, optim as schedules
from mergejax.core.models import make_model
from mergejax.core.train import create_state, model_apply_fn
from mergejax.ensembles.snapshot import curve_summary, ensemble_curve, final_snapshot, fit_with_snapshots
from mergejax.ensembles.swa import budget_step, equal_budget_plans, fge_cycle_steps, swa_model, with_swa_average
from mergejax.experiment import experiment_main, unit
from mergejax.run import num_steps

NAME, ORDER, PRESETS = "snapshot_ensemble", 20, ("tiny", "digits", "smoke", "paper")


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    sgd = dict(momentum=0.9, nesterov=True, lr=0.1)  # train: the budget B, batch, optimizer (lr: the single model's); M = num_snapshots
    c = ml_collections.ConfigDict(dict(  # SWA: Izmailov et al. 2018 (CIFAR, lr_init 0.1); starts: fractions of B
        seeds=(0, 1, 2), num_snapshots=5, alpha0s=(0.1, 0.2), single_cycle_alpha0=0.1, swa_lr=0.05, swa_start=0.5, fge_start=0.5,
        fge_alpha1=0.05, fge_alpha2=0.0005, eval_batch_size=500))
    small = dict(dataset="digits", model="cnn", model_kwargs={"width": 0.25}, batch_size=64, weight_decay=5e-4, log_every=11, **sgd)
    if preset == "paper":
        # Huang et al. 2017, Sec. 4: ResNet-110 on CIFAR-10, B = 200 epochs, M = 5 cycles of 40 epochs, batch 64, SGD Nesterov 0.9,
        # wd 1e-4, augmentation; single model 0.1, /10 at 50%, 75%. SWA (Izmailov et al. 2018), FGE (Garipov et al. 2018): CIFAR settings.
        c.update(train=train_config(dataset="cifar10", model="resnet110", batch_size=64, epochs=200.0, weight_decay=1e-4,
                                    augment=True, log_every=200, **sgd), seeds=(0,))
    elif preset == "smoke":  # seconds: the pipeline end to end (CI), not the method (2 epochs, M = 2, one seed)
        c.update(train=train_config(epochs=2.0, **small), seeds=(0,), num_snapshots=2)
    else:  # tiny: quarter-width SmallCNN (BatchNorm), M = 5 cycles of 3 epochs of 22 steps; a checkpoint every 5 epochs
        c.train = train_config(epochs=15.0, checkpoint_every=110, **small)
    return c


def run_seed(config, data, out_dir: str, seed: int, total: int, sched: dict, progress: bool) -> dict:
    (train, test), cfg, M, t0, units, finals = data, config.train, config.num_snapshots, time.perf_counter(), {}, {}
    model = make_model(cfg.model, train.num_classes, **dict(cfg.model_kwargs))
    ucfg = lambda **deps: {"train": to_dict(cfg), "eval_batch_size": config.eval_batch_size, "seed": seed,  # noqa: E731
                           "num_snapshots": M, **deps}

    def do(name, deps, fn):
        units[name] = unit(out_dir, f"seed{seed}/{name}", ucfg(**deps), fn)
        if progress:
            print(f"  seed {seed}: {name} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    def train_run(name, run_seed, deps, schedule=None, marks=None, curves={}):  # noqa: B006 (read only)
        plan = sched[schedule or name]

        def fn(workdir):
            tx = schedules.make_optimizer(cfg.optimizer, plan.lr_fn, **{k: cfg[k] for k in ("momentum", "nesterov", "weight_decay",
                                                                                        "grad_clip")})
            tx = with_swa_average(tx, plan.marks[0], plan.swa_every) if plan.swa_every else tx  # SWA marks: its averages
            state = create_state(model, jax.random.key(run_seed), (1, *train.images.shape[1:]), tx, lr_fn=plan.lr_fn,
                                 augment_fn=data_lib.augment_cifar if cfg.augment else None)
            state, snaps, records = fit_with_snapshots(
                state, train, plan.marks if marks is None else marks, workdir, num_steps=plan.num_steps, seed=run_seed, progress=False,
                manifest=ucfg(**deps), **{k: cfg[k] for k in ("batch_size", "log_every", "remainder", "checkpoint_every")})
            finals[name] = {"params": state.params, "batch_stats": state.batch_stats}  # for the ensemble units below
            t1, losses = time.perf_counter(), [r for r in records if r["split"] == "train"]
            out = {k: ensemble_curve(state.apply_fn, pick(state, snaps), test, config.eval_batch_size) for k, pick in curves.items()}
            return {"curves": out, "losses": losses, "wall_time_s": losses[-1]["time_s"] + time.perf_counter() - t1}
        do(name, deps, fn)

    def ensemble(name, members, deps):  # final models of other units: in memory if trained in this process
        def fn(workdir):
            t1, snaps = time.perf_counter(), [finals.pop(m, None) or final_snapshot(os.path.join(workdir, "..", m)) for m in members]
            curve = ensemble_curve(model_apply_fn(model), snaps, test, config.eval_batch_size)
            return {"curves": {name: curve}, "wall_time_s": time.perf_counter() - t1}
        do(name, deps, fn)

    train_run("single-0", 1000 * seed, {"member": 0}, "single", curves={"single": lambda st, sn: sn[-1:], "nocycle": lambda st, sn: sn})
    for j in range(1, M):
        train_run(f"single-{j}", 1000 * seed + j, {"member": j}, "single", marks=(total,))
    ensemble("true_ensemble", [f"single-{j}" for j in range(M)], {})
    for j in range(M):
        train_run(f"single_cycle-{j}", 1000 * seed + 100 + j, {"single_cycle_alpha0": config.single_cycle_alpha0, "member": j})
    ensemble("single_cycle", [f"single_cycle-{j}" for j in range(M)], {"single_cycle_alpha0": config.single_cycle_alpha0})
    for a in config.alpha0s:
        train_run(f"snapshot_{a}", 1000 * seed, {"alpha0": a}, curves={f"snapshot_{a}": lambda st, sn: sn})
    train_run("swa", 1000 * seed, {k: config[k] for k in ("swa_lr", "swa_start")}, marks=(),  # swa_final_sgd: its last iterate
              curves={"swa": lambda st, sn: [swa_model(st, train, cfg.batch_size, seed=seed)], "swa_final_sgd": lambda *_: [finals["swa"]]})
    train_run("fge", 1000 * seed, {k: config[k] for k in ("fge_start", "fge_alpha1", "fge_alpha2")}, curves={"fge": lambda st, sn: sn})
    losses = {"single": "single-0", **{f"snapshot a0={a}": f"snapshot_{a}" for a in config.alpha0s}, "SWA": "swa", "FGE": "fge"}
    return {"curves": {k: v for u in units.values() for k, v in u["curves"].items()},
            "losses": {label: units[name]["losses"] for label, name in losses.items()}, "fge_boundaries": list(sched["fge"].marks),
            "fge_cycle_steps": fge_cycle_steps(budget_step(config.fge_start, total), total, M),
            "swa_start": budget_step(config.swa_start, total), "wall_time_s": sum(u["wall_time_s"] for u in units.values())}


def run(config, out_dir: str, progress: bool = True) -> dict:
    (train, test), M = (data_lib.load(config.train.dataset, split) for split in ("train", "test")), config.num_snapshots
    total, per_epoch = num_steps(config.train, len(train))
    sched = equal_budget_plans(total, per_epoch, M, config.train.lr, alpha0s=tuple(config.alpha0s), **{k: config[k] for k in (
        "single_cycle_alpha0", "swa_lr", "swa_start", "fge_start", "fge_alpha1", "fge_alpha2")})
    runs = {seed: run_seed(config, (train, test), out_dir, seed, total, sched, progress) for seed in config.seeds}
    rows = [("single", "Single model (step schedule)", 1), ("nocycle", "NoCycle snapshot ensemble", 1),
            ("single_cycle", "Single-Cycle ensemble", 1), *[(f"snapshot_{a}", f"Snapshot ensemble a0={a}", 1) for a in config.alpha0s],
            ("swa_final_sgd", "SWA run, last iterate", 1), ("swa", "SWA (BN re-estimated)", 1), ("fge", "FGE", 1),
            ("true_ensemble", "True ensemble", M)]
    summary = {key: curve_summary([runs[s]["curves"][key] for s in config.seeds]) for key, _, _ in rows}
    fmt = lambda s, digits=2: f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"  # noqa: E731 (report.fmt_mean_std of a summary)
    table_rows = [{"method": label, "budgets": cost, "members": (x := summary[key])["members"],
                   "test error % (soft avg)": fmt(x["error_pct"]), "NLL": fmt(x["nll"], 3),
                   "hard-vote error %": fmt(x["vote_error_pct"]) if x["members"] > 1 else "",
                   "last member alone %": fmt(x["error_vs_m_pct"][0])} for key, label, cost in rows]
    err = {a: summary[f"snapshot_{a}"]["error_pct"] for a in config.alpha0s}
    best, single = min(config.alpha0s, key=lambda a: err[a]["mean"]), summary["single"]["error_pct"]
    verdicts = ", ".join(f"a0 = {a}: {'beats' if err[a]['mean'] < single['mean'] else 'does not beat'}" for a in config.alpha0s)
    table = (f"`{config.train.model}` ({dict(config.train.model_kwargs)}) on `{config.train.dataset}`, budget B = {total} steps "
             f"({total / per_epoch:.1f} epochs, batch {config.train.batch_size}), M = {M}; mean ± std over seeds "
             f"{list(config.seeds)}; test set of {len(test)} examples. Ensembles average softmax outputs of their members.\n\n"
             + report.markdown_table(table_rows)
             + f"\nSnapshot ensemble (best a0 = {best}): {err[best]['mean']:.2f} ± {err[best]['std']:.2f} % vs single model "
             f"{single['mean']:.2f} ± {single['std']:.2f} % at equal cost ({verdicts} the single model on the mean).\n")
    t, first = np.arange(total), runs[config.seeds[0]]["losses"]
    vs_m = lambda p: ([1, M], [p[0]["mean"]] * 2) if len(p) == 1 else (list(range(1, len(p) + 1)), [x["mean"] for x in p])  # noqa: E731
    plots = [report.plot_curves(os.path.join(out_dir, "lr_schedules.png"), {k: (t + 1, np.asarray(jax.vmap(v.lr_fn)(t))) for k, v in
                                sched.items() if not k.startswith("single_cycle")}, xlabel="iteration t", ylabel="learning rate"),
             report.plot_curves(os.path.join(out_dir, "train_loss.png"), {k: ([h["step"] for h in v], [h["loss"] for h in v])
                                for k, v in first.items()}, xlabel="step", ylabel="training loss (first seed)", logy=True),
             report.plot_curves(os.path.join(out_dir, "error_vs_m.png"), {lab: vs_m(summary[k]["error_vs_m_pct"]) for k, lab, _ in rows},
                                xlabel="m (ensemble of the last m members)", ylabel="test error % (mean over seeds)")]
    results = {"experiment": NAME, "config": to_dict(config), "budget_steps": total, "steps_per_epoch": per_epoch, "summary": summary,
               "runs": {str(s): {k: v for k, v in r.items() if k != "losses"} for s, r in runs.items()},
               "snapshot_boundaries": list(schedules.snapshot_boundaries(total, M)), "plots": [os.path.basename(p) for p in plots],
               "wall_time_s": sum(r["wall_time_s"] for r in runs.values()), "device_kind": jax.devices()[0].device_kind}  # wall: all units
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": plots}


def main(argv=None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
