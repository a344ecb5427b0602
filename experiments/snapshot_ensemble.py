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
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mergejax import data as data_lib  # noqa: E402
from mergejax import report, schedules  # noqa: E402
from mergejax.config import TrainConfig, experiment_main, to_dict  # noqa: E402
from mergejax.models import make_model  # noqa: E402
from mergejax.run import num_steps  # noqa: E402
from mergejax.snapshot import SnapshotCollector, evaluate_ensemble, stack_trees  # noqa: E402
from mergejax.swa import fge_plan, recompute_batch_stats, swa_average, swa_params  # noqa: E402
from mergejax.train import create_state, fit, make_optimizer, model_apply_fn  # noqa: E402

NAME = "snapshot_ensemble"
ORDER = 20


@dataclasses.dataclass(frozen=True)
class SnapshotConfig:
    train: TrainConfig  # the budget B (epochs or steps), batch, optimizer; lr = single-model lr
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
    # about a minute of CPU; M = 5 cycles of 3 epochs each.
    return SnapshotConfig(
        TrainConfig(dataset="digits", model="cnn", model_kwargs={"width": 0.25}, batch_size=64, epochs=15.0, lr=0.1,
                    momentum=0.9, nesterov=True, weight_decay=5e-4, log_every=11),
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


class _Trainer:
    """One model and one optimizer per schedule for every seed: with ``fit``'s and
    ``evaluate_ensemble``'s process-wide jits, runs with the same schedule compile once."""

    def __init__(self, cfg: TrainConfig, train, test, eval_batch_size):
        self.cfg, self.train, self.test, self.eval_bs = cfg, train, test, eval_batch_size
        self.model = make_model(cfg.model, train.num_classes, **dict(cfg.model_kwargs))
        self.shape = (1, *train.images.shape[1:])
        self._tx: dict = {}
        self.apply_fn = model_apply_fn(self.model)  # the object create_state puts in every state

    def tx(self, key, lr_fn, extra=()):
        if key not in self._tx:  # same (tx, lr_fn) objects -> the jit cache hits across seeds
            base = make_optimizer(self.cfg.optimizer, lr_fn, momentum=self.cfg.momentum, nesterov=self.cfg.nesterov,
                                  weight_decay=self.cfg.weight_decay, grad_clip=self.cfg.grad_clip)
            self._tx[key] = (optax.chain(base, *extra) if extra else base, lr_fn)
        return self._tx[key]

    def run(self, key, lr_fn, steps, seed, callbacks=(), extra=()):
        tx, lr_fn = self.tx(key, lr_fn, extra)
        state = create_state(self.model, jax.random.key(seed), self.shape, tx, lr_fn=lr_fn,
                             augment_fn=data_lib.augment_cifar if self.cfg.augment else None)
        state, history = fit(state, self.train, num_steps=steps, batch_size=self.cfg.batch_size, seed=seed,
                             log_every=self.cfg.log_every, remainder=self.cfg.remainder, callbacks=callbacks,
                             progress=False)
        return state, [h for h in history if h["split"] == "train"]

    def curve(self, members):
        """Ensemble metrics for the last m of ``members`` ([(params, batch_stats)]), m = 1..M."""
        st = stack_trees([{"params": p, "batch_stats": s} for p, s in members])
        return evaluate_ensemble(self.apply_fn, st["params"], st["batch_stats"], self.test, self.eval_bs)


def _members(collector):
    return [(s["params"], s["batch_stats"]) for s in collector.snapshots()]


def run_seed(tr: _Trainer, config: SnapshotConfig, total: int, per_epoch: int, seed: int, progress: bool) -> dict:
    M, lr = config.num_snapshots, config.train.lr
    bounds = schedules.snapshot_boundaries(total, M)
    out, losses = {}, {}

    def log(name):
        if progress:
            print(f"  seed {seed}: {name} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    t0 = time.perf_counter()
    # single models (the first one also gives the NoCycle snapshots); M of them = true ensemble
    step_lr = schedules.step_decay(lr, total)
    singles = []
    for j in range(M):
        nocycle = SnapshotCollector(bounds) if j == 0 else None
        state, hist = tr.run("step", step_lr, total, 1000 * seed + j, callbacks=[nocycle] if nocycle else [])
        singles.append((state.params, state.batch_stats))
        if j == 0:
            out["single"] = tr.curve(singles[:1])
            out["nocycle"] = tr.curve(_members(nocycle))
            losses["single"] = hist
    out["true_ensemble"] = tr.curve(singles)
    log("single / NoCycle / true ensemble")

    # Single-Cycle ensembles: M fresh models, one cosine cycle each, lengths summing to the budget
    starts = schedules.cycle_starts(total, M)
    members = []
    for j, length in enumerate(np.diff(starts)):
        state, _ = tr.run(("single_cycle", int(length)), schedules.snapshot_cosine(config.single_cycle_alpha0, int(length), 1),
                          int(length), 1000 * seed + 100 + j)
        members.append((state.params, state.batch_stats))
    out["single_cycle"] = tr.curve(members)
    log("Single-Cycle")

    for a0 in config.alpha0s:
        col = SnapshotCollector(bounds)
        _, hist = tr.run(("snapshot", a0), schedules.snapshot_cosine(a0, total, M), total, 1000 * seed, callbacks=[col])
        out[f"snapshot_{a0}"] = tr.curve(_members(col))
        losses[f"snapshot a0={a0}"] = hist
    log("snapshot ensembles")

    swa_start = max(1, int(round(config.swa_start * total)))
    state, hist = tr.run("swa", schedules.swa_schedule(lr, config.swa_lr, swa_start), total, 1000 * seed,
                         extra=(swa_average(swa_start, per_epoch),))
    params = swa_params(state.opt_state)
    bs = recompute_batch_stats(tr.apply_fn, params, state.batch_stats, tr.train, config.train.batch_size, seed=seed)
    out["swa"] = tr.curve([(params, bs)])
    out["swa_final_sgd"] = tr.curve([(state.params, state.batch_stats)])  # the last iterate of the SWA run
    losses["SWA"] = hist
    log("SWA")

    fge_start = max(1, int(round(config.fge_start * total)))
    cycle = max(2, ((total - fge_start) // M) // 2 * 2)
    fge_lr, fge_bounds = fge_plan(schedules.swa_schedule(lr, config.fge_alpha1, fge_start), fge_start,
                                  config.fge_alpha1, config.fge_alpha2, cycle, total)
    col = SnapshotCollector(fge_bounds)
    _, hist = tr.run("fge", fge_lr, total, 1000 * seed, callbacks=[col])
    out["fge"] = tr.curve(_members(col))
    losses["FGE"] = hist
    log("FGE")
    return {"curves": out, "losses": losses, "fge_boundaries": list(fge_bounds), "fge_cycle_steps": cycle,
            "swa_start": swa_start, "wall_time_s": time.perf_counter() - t0}


ROWS = [  # (key, label, cost in budgets)
    ("single", "Single model (step schedule)", 1),
    ("nocycle", "NoCycle snapshot ensemble", 1),
    ("single_cycle", "Single-Cycle ensemble", 1),
    ("snapshot_0.1", "Snapshot ensemble a0=0.1", 1),
    ("snapshot_0.2", "Snapshot ensemble a0=0.2", 1),
    ("swa_final_sgd", "SWA run, last iterate", 1),
    ("swa", "SWA (BN re-estimated)", 1),
    ("fge", "FGE", 1),
    ("true_ensemble", "True ensemble", None),
]


def run(config: SnapshotConfig, out_dir: str, progress: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    train = data_lib.load(config.train.dataset, "train")
    test = data_lib.load(config.train.dataset, "test")
    total, per_epoch = num_steps(config.train, len(train))
    tr = _Trainer(config.train, train, test, config.eval_batch_size)
    t0 = time.perf_counter()
    runs = {}
    for seed in config.seeds:
        runs[seed] = run_seed(tr, config, total, per_epoch, seed, progress)
    wall = time.perf_counter() - t0

    M = config.num_snapshots
    keys = [k for k, _, _ in ROWS if k in runs[config.seeds[0]]["curves"]]
    summary, rows = {}, []
    for key, label, cost in ROWS:
        if key not in keys:
            continue
        curves = [runs[s]["curves"][key] for s in config.seeds]
        err = [100 * c["error"][-1] for c in curves]
        nll = [c["nll"][-1] for c in curves]
        vote = [100 * (1 - c["vote_accuracy"][-1]) for c in curves]
        summary[key] = {"error_pct": report.mean_std(err), "nll": report.mean_std(nll), "vote_error_pct": report.mean_std(vote),
                        "members": len(curves[0]["m"]),
                        "error_vs_m_pct": [report.mean_std([100 * c["error"][i] for c in curves]) for i in range(len(curves[0]["m"]))]}
        rows.append({"method": label, "budgets": cost if cost is not None else M, "members": len(curves[0]["m"]),
                     "test error % (soft avg)": report.fmt_mean_std(err), "NLL": report.fmt_mean_std(nll, digits=3),
                     "hard-vote error %": report.fmt_mean_std(vote) if len(curves[0]["m"]) > 1 else "",
                     "last member alone %": report.fmt_mean_std([100 * c["error"][0] for c in curves])})
    best_a0 = min(config.alpha0s, key=lambda a: summary[f"snapshot_{a}"]["error_pct"]["mean"])
    table = (f"`{config.train.model}` ({dict(config.train.model_kwargs)}) on `{config.train.dataset}`, budget B = {total} steps "
             f"({total / per_epoch:.1f} epochs, batch {config.train.batch_size}), M = {M}; mean ± std over seeds "
             f"{list(config.seeds)}; test set of {len(test)} examples. Ensembles average softmax outputs of their members.\n\n")
    table += report.markdown_table(rows)
    best = summary[f"snapshot_{best_a0}"]["error_pct"]
    single = summary["single"]["error_pct"]
    verdicts = ", ".join(f"a0 = {a}: {'beats' if summary[f'snapshot_{a}']['error_pct']['mean'] < single['mean'] else 'does not beat'}"
                         for a in config.alpha0s)
    table += (f"\nSnapshot ensemble (best a0 = {best_a0}): {best['mean']:.2f} ± {best['std']:.2f} % vs single model "
              f"{single['mean']:.2f} ± {single['std']:.2f} % at equal cost ({verdicts} the single model on the mean).\n")

    plots = [_plot_schedules(config, total, per_epoch, runs[config.seeds[0]], os.path.join(out_dir, "lr_schedules.png")),
             _plot_losses(runs[config.seeds[0]]["losses"], os.path.join(out_dir, "train_loss.png")),
             _plot_error_vs_m(summary, os.path.join(out_dir, "error_vs_m.png"))]
    results = {
        "experiment": NAME, "config": to_dict(config), "budget_steps": total, "steps_per_epoch": per_epoch,
        "summary": summary, "runs": {str(s): {k: v for k, v in r.items() if k != "losses"} for s, r in runs.items()},
        "snapshot_boundaries": list(schedules.snapshot_boundaries(total, M)),
        "wall_time_s": wall, "device_kind": jax.devices()[0].device_kind, "plots": [os.path.basename(p) for p in plots],
    }
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": plots}


def _plot_schedules(config, total, per_epoch, run0, path):
    plt = report.pyplot()
    M, lr = config.num_snapshots, config.train.lr
    counts = jnp.arange(total)
    swa_start = run0["swa_start"]
    fge_lr, _ = fge_plan(schedules.swa_schedule(lr, config.fge_alpha1, int(round(config.fge_start * total))),
                         int(round(config.fge_start * total)), config.fge_alpha1, config.fge_alpha2, run0["fge_cycle_steps"], total)
    scheds = {"single / NoCycle (step)": (schedules.step_decay(lr, total), schedules.snapshot_boundaries(total, M))}
    for a0 in config.alpha0s:
        scheds[f"snapshot a0={a0}"] = (schedules.snapshot_cosine(a0, total, M), schedules.snapshot_boundaries(total, M))
    scheds["SWA"] = (schedules.swa_schedule(lr, config.swa_lr, swa_start), tuple(range(swa_start, total + 1, per_epoch)))
    scheds["FGE"] = (fge_lr, tuple(run0["fge_boundaries"]))
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, (fn, marks) in scheds.items():
        vals = np.asarray(jax.vmap(fn)(counts))
        line, = ax.plot(np.arange(1, total + 1), vals, label=label, lw=1.2)
        ax.plot(marks, vals[np.asarray(marks) - 1], "o", color=line.get_color(), ms=4)
    ax.set_xlabel("iteration t (markers: snapshot / average taken after this step)")
    ax.set_ylabel("learning rate")
    ax.set_title(f"schedules, B = {total} steps, M = {M}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return report.save_figure(fig, path)


def _plot_losses(losses, path):
    curves = {k: ([h["step"] for h in v], [h["loss"] for h in v]) for k, v in losses.items()}
    return report.plot_curves(path, curves, xlabel="step", ylabel="training loss (nats, mean per log interval)", logy=True,
                              title="training loss (first seed)")


def _plot_error_vs_m(summary, path):
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, _ in ROWS:
        if key not in summary:
            continue
        pts = summary[key]["error_vs_m_pct"]
        if len(pts) == 1:  # single models: a horizontal line each
            style = {"single": ("gray", "--"), "swa": ("black", ":"), "swa_final_sgd": ("tab:olive", "-.")}.get(key, ("gray", ":"))
            ax.axhline(pts[0]["mean"], color=style[0], ls=style[1], lw=1.2, label=label)
            continue
        ms = np.arange(1, len(pts) + 1)
        ax.errorbar(ms, [p["mean"] for p in pts], yerr=[p["std"] for p in pts], marker="o", ms=3, capsize=2, label=label)
    ax.set_xlabel("m (ensemble of the last m members)")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_ylabel("test error (%)")
    ax.set_title("ensemble error vs m (mean ± std over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return report.save_figure(fig, path)


def main(argv=None):
    experiment_main(argv, PRESETS, NAME, __doc__, run)


if __name__ == "__main__":
    main()
