"""Snapshot Ensembles (Huang et al. 2017, Table 1) beside SWA and FGE, at equal training cost.

    python experiments/snapshot_ensemble.py                   # tiny: small CNN on digits, 3 seeds, CPU, minutes
    python experiments/snapshot_ensemble.py --preset paper    # ResNet-110 on CIFAR-10, 200 epochs, M = 5, batch 64
    python experiments/snapshot_ensemble.py --set num_snapshots=4 --set seeds=(0,1)

Rows (test error of the ensemble of all M members unless stated), per seed:
  single model      step schedule (lr, /10 at 50% and 75%), 1 budget
  NoCycle           snapshots of that same run at the cycle boundaries, 1 budget
  Single-Cycle ens. M independently initialised models, each one cosine cycle of B/M steps, 1 budget
  snapshot a0       one run of M cosine cycles restarting at a0 (Eq. 2), snapshot per cycle, 1 budget
  true ensemble     M single models with different seeds, M budgets (a lower bound on error)
  SWA               swa_schedule, running mean each epoch from swa_start, BN re-estimated, 1 budget
  FGE               pre-train, then FGE triangles alpha1 -> alpha2, snapshot at each minimum, 1 budget

Resumable units under ``units/seed<k>/``: ``single-<j>`` and ``single_cycle-<j>`` (j < M),
``snapshot_<a0>``, ``swa``, ``fge`` train one model each (checkpoints every
``train.checkpoint_every`` steps, default once per epoch; snapshots kept on disk);
``true_ensemble`` and ``single_cycle`` evaluate members read back from those units.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax import data as data_lib
from mergejax import report, schedules
from mergejax.config import TrainConfig, to_dict
from mergejax.experiment import experiment_main, unit
from mergejax.models import init_variables, make_model
from mergejax.run import num_steps
from mergejax.snapshot import ensemble_curve, fit_with_snapshots, load_snapshots
from mergejax.swa import fge_cycle_steps, fge_plan, swa_average, swa_model
from mergejax.train import create_state, make_optimizer, model_apply_fn

NAME = "snapshot_ensemble"
ORDER = 20


@dataclasses.dataclass(frozen=True)
class SnapshotConfig:
    train: TrainConfig  # the budget B (epochs or steps), batch, optimizer, checkpoint_every; lr = single-model lr
    seeds: tuple = (0, 1, 2)
    num_snapshots: int = 5  # M: cycles / snapshots / ensemble members
    alpha0s: tuple = (0.1, 0.2)  # snapshot-ensemble restart learning rates
    single_cycle_alpha0: float = 0.1  # lr at the start of each Single-Cycle model's cosine
    swa_lr: float = 0.05  # Izmailov et al. 2018 (CIFAR, lr_init 0.1)
    swa_start: float = 0.5  # fraction of the budget where averaging starts (once per epoch)
    fge_start: float = 0.5  # fraction of the budget spent pre-training before the FGE cycles
    fge_alpha1: float = 0.05
    fge_alpha2: float = 0.0005
    eval_batch_size: int = 500


def tiny() -> SnapshotConfig:
    # Quarter-width SmallCNN (8/16/32 channels, BatchNorm) so 3 seeds x 11 budgets fit in
    # about a minute of CPU; M = 5 cycles of 3 epochs each. An epoch is 22 steps (~0.1 s), so a
    # checkpoint every 5 epochs: one per epoch would double the run time.
    return SnapshotConfig(
        TrainConfig(dataset="digits", model="cnn", model_kwargs={"width": 0.25}, batch_size=64, epochs=15.0, lr=0.1,
                    momentum=0.9, nesterov=True, weight_decay=5e-4, log_every=11, checkpoint_every=110),
        seeds=(0, 1, 2), num_snapshots=5)


def paper() -> SnapshotConfig:
    # Huang et al. 2017, Sec. 4: ResNet-110 on CIFAR-10, B = 200 epochs, M = 5 cycles of 40 epochs,
    # batch 64, SGD with Nesterov momentum 0.9, weight decay 1e-4, standard augmentation;
    # single model 0.1, /10 at 50% and 75%. SWA (Izmailov et al. 2018) and FGE (Garipov et al. 2018)
    # use their CIFAR settings scaled to the same budget.
    return SnapshotConfig(
        TrainConfig(dataset="cifar10", model="resnet110", batch_size=64, epochs=200.0, lr=0.1, momentum=0.9,
                    nesterov=True, weight_decay=1e-4, augment=True, log_every=200),
        seeds=(0,), num_snapshots=5, swa_lr=0.05, fge_alpha1=0.05, fge_alpha2=0.0005)


def smoke() -> SnapshotConfig:
    """Seconds: checks the pipeline end to end (CI), not the method (2 epochs, M = 2, one seed)."""
    return SnapshotConfig(
        TrainConfig(dataset="digits", model="cnn", model_kwargs={"width": 0.25}, batch_size=64, epochs=2.0, lr=0.1,
                    momentum=0.9, nesterov=True, weight_decay=5e-4, log_every=11),
        seeds=(0,), num_snapshots=2)


PRESETS = {"tiny": tiny, "digits": tiny, "paper": paper, "smoke": smoke}



def rows(config: SnapshotConfig) -> list:
    """The table's rows: (key, label, cost in budgets; None = M)."""
    return [("single", "Single model (step schedule)", 1), ("nocycle", "NoCycle snapshot ensemble", 1),
            ("single_cycle", "Single-Cycle ensemble", 1),
            *[(f"snapshot_{a}", f"Snapshot ensemble a0={a}", 1) for a in config.alpha0s],
            ("swa_final_sgd", "SWA run, last iterate", 1), ("swa", "SWA (BN re-estimated)", 1), ("fge", "FGE", 1),
            ("true_ensemble", "True ensemble", None)]


def _start(fraction: float, total: int) -> int:
    return max(1, int(round(fraction * total)))


def plan(config: SnapshotConfig, total: int, per_epoch: int) -> dict:
    """Every run's schedule: name -> (lr_fn, optimizer, steps marked: snapshots or SWA averages).
    Built once per experiment: runs sharing a schedule (every seed, every true-ensemble member)
    then share one optimizer object, hence one traced and compiled train step."""
    cfg, M, lr = config.train, config.num_snapshots, config.train.lr

    def opt(lr_fn, *extra):
        tx = make_optimizer(cfg.optimizer, lr_fn, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                            grad_clip=cfg.grad_clip)
        return lr_fn, optax.chain(tx, *extra) if extra else tx

    bounds = schedules.snapshot_boundaries(total, M)
    swa_start, fge_start = _start(config.swa_start, total), _start(config.fge_start, total)
    out = {"single": (*opt(schedules.step_decay(lr, total)), bounds)}
    out.update({f"snapshot_{a0}": (*opt(schedules.snapshot_cosine(a0, total, M)), bounds) for a0 in config.alpha0s})
    out["swa"] = (*opt(schedules.swa_schedule(lr, config.swa_lr, swa_start), swa_average(swa_start, per_epoch)),
                  tuple(range(swa_start, total + 1, per_epoch)))
    fge_lr, fge_bounds = fge_plan(schedules.swa_schedule(lr, config.fge_alpha1, fge_start), fge_start, config.fge_alpha1,
                                  config.fge_alpha2, fge_cycle_steps(fge_start, total, M), total)
    out["fge"] = (*opt(fge_lr), fge_bounds)
    lengths = np.diff(schedules.cycle_starts(total, M)).tolist()  # M cosine cycles summing to the budget
    cycles = {n: opt(schedules.snapshot_cosine(config.single_cycle_alpha0, n, 1)) for n in set(lengths)}
    out.update({f"single_cycle-{j}": (*cycles[n], (n,)) for j, n in enumerate(lengths)})
    return out


def _state(cfg: TrainConfig, train, lr_fn, tx, seed: int):
    model = make_model(cfg.model, train.num_classes, **dict(cfg.model_kwargs))
    return create_state(model, jax.random.key(seed), (1, *train.images.shape[1:]), tx, lr_fn=lr_fn,
                        augment_fn=data_lib.augment_cifar if cfg.augment else None)


def train_unit(config, data, ucfg, lr_fn, tx, steps, seed, boundaries, curves):
    """A unit body: one resumable run (snapshots at ``boundaries`` on disk), then the ensemble
    curves ``{name: (state, snapshots) -> members}`` and the run's train-loss records."""
    train, test = data

    def fn(workdir):
        state, snaps, records = fit_with_snapshots(
            _state(config.train, train, lr_fn, tx, seed), train, boundaries, workdir, num_steps=steps, seed=seed,
            batch_size=config.train.batch_size, log_every=config.train.log_every, remainder=config.train.remainder,
            checkpoint_every=config.train.checkpoint_every, manifest=ucfg, progress=False)
        t0, losses = time.perf_counter(), [r for r in records if r["split"] == "train"]
        out = {k: ensemble_curve(state.apply_fn, pick(state, snaps), test, config.eval_batch_size) for k, pick in curves.items()}
        return {"curves": out, "losses": losses, "wall_time_s": losses[-1]["time_s"] + time.perf_counter() - t0}
    return fn


def ensemble_unit(config, data, name, member_dirs):
    """A unit body: the curve of the final snapshots of other units' runs, read from disk."""
    def fn(workdir):
        t0, (train, test), cfg = time.perf_counter(), data, config.train
        model = make_model(cfg.model, train.num_classes, **dict(cfg.model_kwargs))
        params, batch_stats = init_variables(model, jax.random.key(0), (1, *train.images.shape[1:]))
        members = [load_snapshots(d, {"params": params, "batch_stats": batch_stats})[-1] for d in member_dirs]
        return {"curves": {name: ensemble_curve(model_apply_fn(model), members, test, config.eval_batch_size)},
                "wall_time_s": time.perf_counter() - t0}
    return fn


def run_seed(config: SnapshotConfig, data, out_dir: str, seed: int, total: int, sched: dict, progress: bool) -> dict:
    M, t0, units = config.num_snapshots, time.perf_counter(), {}
    snaps_of = lambda name: os.path.join(out_dir, "units", f"seed{seed}", name, "snapshots")  # noqa: E731

    def cfg(*fields, **extra):  # what a unit's result depends on
        return {"train": to_dict(config.train), "eval_batch_size": config.eval_batch_size, "seed": seed, "num_snapshots": M,
                **{f: getattr(config, f) for f in fields}, **extra}

    def do(name, ucfg, fn):
        units[name] = unit(out_dir, f"seed{seed}/{name}", ucfg, fn)
        if progress:
            print(f"  seed {seed}: {name} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    def train(name, ucfg, schedule, run_seed, boundaries=None, curves=None):
        lr_fn, tx, marks = sched[schedule]
        steps = marks[-1] if schedule.startswith("single_cycle") else total
        do(name, ucfg, train_unit(config, data, ucfg, lr_fn, tx, steps, run_seed, marks if boundaries is None else boundaries,
                                  curves or {}))

    # single models (the first one also gives the NoCycle snapshots); M of them = true ensemble
    train("single-0", cfg(member=0), "single", 1000 * seed, curves={"single": lambda st, sn: sn[-1:], "nocycle": lambda st, sn: sn})
    for j in range(1, M):
        train(f"single-{j}", cfg(member=j), "single", 1000 * seed + j, boundaries=(total,))
    do("true_ensemble", cfg(), ensemble_unit(config, data, "true_ensemble", [snaps_of(f"single-{j}") for j in range(M)]))
    for j in range(M):
        train(f"single_cycle-{j}", cfg("single_cycle_alpha0", member=j), f"single_cycle-{j}", 1000 * seed + 100 + j)
    do("single_cycle", cfg("single_cycle_alpha0"),
       ensemble_unit(config, data, "single_cycle", [snaps_of(f"single_cycle-{j}") for j in range(M)]))
    for a0 in config.alpha0s:
        train(f"snapshot_{a0}", cfg(alpha0=a0), f"snapshot_{a0}", 1000 * seed, curves={f"snapshot_{a0}": lambda st, sn: sn})
    train("swa", cfg("swa_lr", "swa_start"), "swa", 1000 * seed, boundaries=(),
          curves={"swa": lambda st, sn: [swa_model(st, data[0], config.train.batch_size, seed=seed)],
                  "swa_final_sgd": lambda st, sn: [{"params": st.params, "batch_stats": st.batch_stats}]})  # its last iterate
    train("fge", cfg("fge_start", "fge_alpha1", "fge_alpha2"), "fge", 1000 * seed, curves={"fge": lambda st, sn: sn})
    losses = {"single": "single-0", **{f"snapshot a0={a}": f"snapshot_{a}" for a in config.alpha0s}, "SWA": "swa", "FGE": "fge"}
    return {"curves": {k: v for u in units.values() for k, v in u["curves"].items()},
            "losses": {label: units[name]["losses"] for label, name in losses.items()},
            "fge_boundaries": list(sched["fge"][2]), "fge_cycle_steps": fge_cycle_steps(_start(config.fge_start, total), total, M),
            "swa_start": _start(config.swa_start, total), "wall_time_s": sum(u["wall_time_s"] for u in units.values())}


def run(config: SnapshotConfig, out_dir: str, progress: bool = True) -> dict:
    data = (data_lib.load(config.train.dataset, "train"), data_lib.load(config.train.dataset, "test"))
    total, per_epoch = num_steps(config.train, len(data[0]))
    sched = plan(config, total, per_epoch)
    runs = {seed: run_seed(config, data, out_dir, seed, total, sched, progress) for seed in config.seeds}
    M, summary, table_rows = config.num_snapshots, {}, []
    for key, label, cost in rows(config):
        curves = [runs[s]["curves"][key] for s in config.seeds]
        err, nll = [100 * c["error"][-1] for c in curves], [c["nll"][-1] for c in curves]
        vote, m = [100 * (1 - c["vote_accuracy"][-1]) for c in curves], len(curves[0]["m"])
        summary[key] = {"error_pct": report.mean_std(err), "nll": report.mean_std(nll), "vote_error_pct": report.mean_std(vote),
                        "members": m, "error_vs_m_pct": [report.mean_std([100 * c["error"][i] for c in curves]) for i in range(m)]}
        table_rows.append({"method": label, "budgets": cost if cost is not None else M, "members": m,
                           "test error % (soft avg)": report.fmt_mean_std(err), "NLL": report.fmt_mean_std(nll, digits=3),
                           "hard-vote error %": report.fmt_mean_std(vote) if m > 1 else "",
                           "last member alone %": report.fmt_mean_std([100 * c["error"][0] for c in curves])})
    err = {a: summary[f"snapshot_{a}"]["error_pct"] for a in config.alpha0s}
    best_a0, single = min(config.alpha0s, key=lambda a: err[a]["mean"]), summary["single"]["error_pct"]
    verdicts = ", ".join(f"a0 = {a}: {'beats' if err[a]['mean'] < single['mean'] else 'does not beat'}" for a in config.alpha0s)
    table = (f"`{config.train.model}` ({dict(config.train.model_kwargs)}) on `{config.train.dataset}`, budget B = {total} steps "
             f"({total / per_epoch:.1f} epochs, batch {config.train.batch_size}), M = {M}; mean ± std over seeds "
             f"{list(config.seeds)}; test set of {len(data[1])} examples. Ensembles average softmax outputs of their members.\n\n"
             + report.markdown_table(table_rows)
             + f"\nSnapshot ensemble (best a0 = {best_a0}): {err[best_a0]['mean']:.2f} ± {err[best_a0]['std']:.2f} % vs single model "
             f"{single['mean']:.2f} ± {single['std']:.2f} % at equal cost ({verdicts} the single model on the mean).\n")
    run0 = runs[config.seeds[0]]
    plots = [_plot_schedules(sched, total, M, os.path.join(out_dir, "lr_schedules.png")),
             report.plot_curves(os.path.join(out_dir, "train_loss.png"),
                                {k: ([h["step"] for h in v], [h["loss"] for h in v]) for k, v in run0["losses"].items()},
                                xlabel="step", ylabel="training loss (nats, mean per log interval)", logy=True,
                                title="training loss (first seed)"),
             _plot_error_vs_m(summary, rows(config), os.path.join(out_dir, "error_vs_m.png"))]
    results = {
        "experiment": NAME, "config": to_dict(config), "budget_steps": total, "steps_per_epoch": per_epoch,
        "summary": summary, "runs": {str(s): {k: v for k, v in r.items() if k != "losses"} for s, r in runs.items()},
        "snapshot_boundaries": list(schedules.snapshot_boundaries(total, M)),
        "wall_time_s": sum(r["wall_time_s"] for r in runs.values()),  # training + evaluation, summed over units and resumes
        "device_kind": jax.devices()[0].device_kind, "plots": [os.path.basename(p) for p in plots],
    }
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": plots}


def _plot_schedules(sched, total, M, path):
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = {"single": "single / NoCycle (step)", "swa": "SWA", "fge": "FGE"}
    for key, (fn, _, marks) in sched.items():
        if key.startswith("single_cycle"):
            continue
        vals = np.asarray(jax.vmap(fn)(jnp.arange(total)))
        line, = ax.plot(np.arange(1, total + 1), vals, label=labels.get(key, key.replace("snapshot_", "snapshot a0=")), lw=1.2)
        ax.plot(marks, vals[np.asarray(marks, int) - 1], "o", color=line.get_color(), ms=4)
    ax.set(xlabel="iteration t (markers: snapshot / average taken after this step)", ylabel="learning rate",
           title=f"schedules, B = {total} steps, M = {M}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return report.save_figure(fig, path)


def _plot_error_vs_m(summary, row_list, path):
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, _ in row_list:
        pts = summary[key]["error_vs_m_pct"]
        if len(pts) == 1:  # single models: a horizontal line each
            color, ls = {"single": ("gray", "--"), "swa": ("black", ":"), "swa_final_sgd": ("tab:olive", "-.")}.get(key, ("gray", ":"))
            ax.axhline(pts[0]["mean"], color=color, ls=ls, lw=1.2, label=label)
        else:
            ax.errorbar(np.arange(1, len(pts) + 1), [p["mean"] for p in pts], yerr=[p["std"] for p in pts], marker="o", ms=3,
                        capsize=2, label=label)
    ax.set(xlabel="m (ensemble of the last m members)", ylabel="test error (%)", title="ensemble error vs m (mean ± std over seeds)")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return report.save_figure(fig, path)


def main(argv=None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
