"""FreezeOut sweep: t0 x spacing x {scaled, unscaled} against a no-freeze baseline;
predicted (XLA FLOP) saving, measured wall-clock saving and accuracy, beside the paper's numbers.

    python experiments/freezeout.py                    # tiny: 7-layer MLP on digits, CPU, a few minutes
    python experiments/freezeout.py --preset paper     # Brock et al. 2017: DenseNet-BC-76, WRN-40-4, VGG-16 (GPU)
    python experiments/freezeout.py --preset paper --set networks=('densenet_bc76',) --dry-run
    python experiments/freezeout.py --set t0s=(0.5,0.8) --set max_stages=2

The paper presets train on 45,000 CIFAR-100 training images and report accuracy on the 5,000 held out
(``validation``), as the authors do. Every timed training (sweep point or baseline timing) is a resumable
unit ``units/[<network>/]seed<k>/<position>-<point>``
(checkpoints in its ``fit/``); a resumed unit reports the time of its resumed part only (flagged in the table).
"""

from __future__ import annotations

import os
import sys

import ml_collections

from mergejax import freezeout as fo
from mergejax import papers, report
from mergejax.papers import freezeout as papers_freezeout
from mergejax.config import placeholder, replace, to_dict, train_config
from mergejax.core import data as data_lib
from mergejax.core.models import make_model
from mergejax.core.optim import make_optimizer
from mergejax.experiment import experiment_main, unit
from mergejax.run import compilation_cache_dir, num_steps

NAME = "freezeout"
ORDER = 30
PRESETS = ("tiny", "digits", "paper", "paper_resnet", "paper_vgg", "smoke")
STYLES = {("linear", True): ("tab:blue", "o"), ("linear", False): ("tab:cyan", "s"), ("cubic", True): ("tab:red", "^"),
          ("cubic", False): ("tab:orange", "v"), ("squared", True): ("tab:green", "D"), ("squared", False): ("tab:olive", "d")}
# The networks of the authors' code (ajbrock/FreezeOut): densenet.py's default DenseNet-BC L=76 k=12; WRN.py (their
# "ResNets"; WRN-40-4 is our pick of depth/width, their script passes -L/-k to it); vgg.py's cfg 'E' with BN
# (13 conv-BN-ReLU layers = our VGG-16).
NETWORKS = {"densenet_bc76": ("densenet_bc76", {}), "wrn40_4": ("wrn", {"depth": 40, "widen": 4}),
            "vgg16": ("vgg16", {}), "resnet56": ("resnet56", {})}
PAPER_NETWORKS = {"paper": ("densenet_bc76", "wrn40_4", "vgg16"), "paper_resnet": ("wrn40_4",), "paper_vgg": ("vgg16",)}
# the abstract's row for each network family, and the accuracy loss (points) it allows at its speedup
ABSTRACT_ROWS = {"densenet_bc76": "DenseNet", "wrn40_4": "ResNet", "resnet56": "ResNet"}


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    """``train``: one training (``lr`` = alpha(0); its ``schedule`` is unused) and the sweep around it.
    ``networks`` (paper presets): the sweep runs once per network; the group of that name gives its
    ``model`` and ``model_kwargs`` (replacing ``train.model``); ``train.model_kwargs`` apply to every
    network unless its group sets the same key, e.g. ``--set train.model_kwargs.width=0.25``.
    ``validation``: examples held out of the training split and evaluated instead of the test split
    (0: train on all, evaluate on test), drawn with ``validation_seed``."""
    sgd = dict(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=1e-4)
    c = ml_collections.ConfigDict()
    c.networks = ()
    c.validation, c.validation_seed = 0, 0
    if preset in PAPER_NETWORKS:
        # Brock et al. 2017 / ajbrock/FreezeOut train.py defaults: CIFAR-100, 100 epochs, batch 50, SGD Nesterov 0.9,
        # wd 1e-4, alpha(0) = 0.1, augmentation on, validation on the last 5,000 training images (45k/5k; ours: a
        # seeded draw). Unlike the authors' code (1000 iterations per epoch assumed), T is the real number of steps
        # (900 per epoch). checkpoint_every is a multiple of log_every, so a resumed unit logs the same losses.
        c.networks = PAPER_NETWORKS[preset]
        for net, (m, kw) in NETWORKS.items():  # one group per network: --set densenet_bc76.model_kwargs.dropout=0.2
            c[net] = ml_collections.ConfigDict({"model": m, "model_kwargs": ml_collections.ConfigDict(kw)})
        model = NETWORKS[c.networks[0]][0]
        c.train = train_config(dataset="cifar100", model=model, batch_size=50, epochs=100.0, lr=0.1, augment=True,
                               log_every=450, checkpoint_every=4500, **sgd)
        c.validation = 5000
    elif preset == "smoke":
        # Seconds: the pipeline end to end (CI), not the method; a mid-run checkpoint exercises the resume.
        c.train = train_config(dataset="digits", model="mlp", model_kwargs={"hidden": (32,) * 3}, batch_size=128, steps=20,
                               lr=0.05, log_every=10, checkpoint_every=10, **sgd)
    else:
        # tiny: 7 layers, ~20 epochs: a meaningful prefix; accuracy differences below ~1% are noise. One
        # checkpoint, at the end: a unit is ~1 s and a save inside the loop would be timed.
        c.train = train_config(dataset="digits", model="mlp", model_kwargs={"hidden": (256,) * 6}, batch_size=128, steps=220,
                               lr=0.05, log_every=220, checkpoint_every=220, **sgd)
    smoke, paper = preset == "smoke", preset in PAPER_NETWORKS
    # paper: every t0 of the authors' FLOP estimates (cubic 0.5-0.9, linear 0.3-0.9), all three spacings
    c.t0s = (0.5,) if smoke else (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9) if paper else (0.5, 0.6, 0.7, 0.8, 0.9)
    c.spacings = ("cubic",) if smoke else ("linear", "squared", "cubic") if paper else ("linear", "cubic")
    c.scalings = (True,) if smoke else (True, False)
    c.max_stages = placeholder(int)  # bound on compiled steps per run (None: one per layer)
    c.seeds = (0,)
    # timed trainings per point (identical results; the minimum time is kept: interference only adds time)
    c.repeats = 2 if preset in ("tiny", "digits") else 1
    c.baseline_every = 4  # re-time the no-freeze baseline after every this many points (0: first and last only)
    return c


def networks(config: ml_collections.ConfigDict) -> list[tuple[str | None, ml_collections.ConfigDict]]:
    """``[(network name or None, its train config)]``: one per entry of ``networks`` (or just ``train``)."""
    if not config.networks:
        return [(None, config.train)]
    out = []
    for net in config.networks:
        group = config.get(net)
        if not isinstance(group, ml_collections.ConfigDict) or "model" not in group:
            raise ValueError(f"unknown FreezeOut network {net!r}; available: {', '.join(n for n in NETWORKS if n in config)}")
        kwargs = {**to_dict(config.train.model_kwargs), **to_dict(group.model_kwargs)}
        out.append((net, replace(config.train, model=group.model, model_kwargs=kwargs)))
    return out


def _points(config) -> list[tuple]:
    points = [(t0, sp, sc) for t0 in config.t0s for sp in config.spacings for sc in config.scalings]
    return fo.timing_sequence(points, config.baseline_every)


def plan(config: ml_collections.ConfigDict) -> list[dict]:
    """One row per timed training (the --dry-run contract): every sweep point and baseline
    timing, ``repeats`` times, per seed and network. Steps are the run's T (FreezeOut skips
    part of the backward, so the FLOPs are an upper bound; the run predicts the saving)."""
    from mergejax.cost import dataset_shape, plan_row

    rows = []
    for net, tc in networks(config):
        n = dataset_shape(tc.dataset).num_train - config.validation
        total, _ = num_steps(tc, n)
        for seed in config.seeds:
            for j, point in enumerate(_points(config)):
                for r in range(config.repeats):
                    name = (f"{net}/" if net else "") + f"seed{seed}/{j:02d}-{_slug(point)}" + (f"/repeat{r}" if r else "")
                    rows.append(plan_row(name, tc, steps=total))
    return rows


def _slug(point) -> str:
    return fo.point_label(point).replace("=", "_").replace(" ", "-")


def run(config: ml_collections.ConfigDict, out_dir: str, progress: bool = True) -> dict:
    tc0 = config.train
    train, test = data_lib.load(tc0.dataset, "train"), data_lib.load(tc0.dataset, "test")
    evaluated_on = "test split"
    if config.validation:
        train, test = fo.holdout(train, config.validation, config.validation_seed)
        evaluated_on = (f"{config.validation} examples held out of the training split (seed {config.validation_seed}; "
                        f"trained on the other {len(train)}), as the authors report validation error")
    sections, all_runs, all_rows, plots, costs, totals = [], [], [], [], {}, {}
    for net, tc in networks(config):
        runs, total = _sweep(config, net, tc, train, test, out_dir, progress)
        rows = [_row(lab, [r for r in runs if r["label"] == lab]) for lab in dict.fromkeys(r["label"] for r in runs)]
        if net:
            rows = [{"network": net, **r} for r in rows]
        sections.append(_table(config, tc, runs, rows, total, evaluated_on, heading=net))
        name = "speed_vs_accuracy.png" if net is None else f"speed_vs_accuracy_{net}.png"
        plots.append(_plot(os.path.join(out_dir, name), runs, f"{tc.model} on {tc.dataset}"))
        all_runs += runs
        all_rows += rows
        costs.update({(f"{net}/" if net else "") + k: c for r in runs for k, c in r["stage_costs"].items()})
        totals[net or tc.model] = total
    comparison = paper_comparison(all_runs, tc0.dataset, {net: to_dict(tc.model_kwargs) for net, tc in networks(config)})
    claims = "".join(f"- {c}\n" for c in papers_freezeout.CLAIMS)
    table = "\n".join(sections) + ("\n**Published numbers** (FreezeOut; flop_estimate: ours = predicted saving from XLA FLOPs "
                                   "per compiled stage; abstract: ours = the largest measured wall-clock saving among "
                                   "points whose accuracy loss against the baseline is within the paper's, and that "
                                   "loss):\n\n" + papers.markdown(comparison) + "\nClaims without a number:\n" + claims)
    resumed = [r["unit"] for r in all_runs if r["resumed"]]
    cache = compilation_cache_dir()
    results = {"experiment": NAME, "config": to_dict(config), "device_kind": all_runs[0]["device_kind"],
               "compilation_cache": cache, "evaluated_on": evaluated_on, "rows": all_rows, "runs": all_runs,
               "stage_costs": costs, "total_steps": totals[next(iter(totals))] if len(totals) == 1 else totals,
               "units_timed_after_resume": resumed, "paper_comparison": comparison,
               "plots": [os.path.basename(p) for p in plots]}
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": plots}


def _sweep(config, net, tc, train, test, out_dir, progress) -> tuple[list[dict], int]:
    """Every timed training of one network: the sweep points between baseline timings."""
    model = make_model(tc.model, train.num_classes, **to_dict(tc.model_kwargs))
    total, _ = num_steps(tc, len(train))
    # unit rate: FreezeOut sets each layer's
    base = make_optimizer(tc.optimizer, 1.0, momentum=tc.momentum, nesterov=tc.nesterov, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)
    loop = dict(total_steps=total, batch_size=tc.batch_size, lr=tc.lr, max_stages=config.max_stages,
                augment_fn=data_lib.augment_cifar if tc.augment else None, remainder=tc.remainder, log_every=tc.log_every,
                checkpoint_every=tc.checkpoint_every, eval_batch_size=tc.eval_batch_size, repeats=config.repeats,
                progress=progress, cache={})  # cache: compiled stages shared by the sweep
    runs = []
    for seed in config.seeds:
        for j, point in enumerate(_points(config)):
            t0, spacing, scaled = point
            name = (f"{net}/" if net else "") + f"seed{seed}/{j:02d}-" + _slug(point)
            ucfg = {"train": to_dict(replace(tc, seed=seed)), "t0": t0, "spacing": spacing, "scaled": scaled,
                    "max_stages": config.max_stages, "repeats": config.repeats}
            if config.validation:
                ucfg["validation"] = [config.validation, config.validation_seed]

            def fn(workdir):
                if progress:
                    print(f"-- {name}", flush=True)
                return {"label": fo.point_label(point), **fo.train_and_evaluate(
                    model, train, test, base, t0=t0, spacing=spacing, scaled=scaled, seed=seed,
                    workdir=os.path.join(workdir, "fit"), manifest=ucfg, **loop)}

            runs.append({**unit(out_dir, name, ucfg, fn), "unit": name, **({"network": net} if net else {})})
    runs = fo.compare_with_baselines([{**r, "order": i} for i, r in enumerate(runs)], lambda r: r["label"] == "baseline")
    return runs, total


def _table(config, tc, runs, rows, total, evaluated_on, heading=None) -> str:
    resumed = [r["unit"] for r in runs if r["resumed"]]  # their times cover the resumed part only
    cache = compilation_cache_dir()
    text = (f"FreezeOut on `{tc.dataset}` with `{tc.model}` {to_dict(tc.model_kwargs)}, {total} steps, batch {tc.batch_size}, "
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


def paper_comparison(runs: list[dict], dataset: str, model_kwargs: dict | None = None) -> dict:
    """Our numbers beside :mod:`mergejax.papers.freezeout` (see the table's note). ``model_kwargs``:
    network -> the kwargs it ran with; the FLOP estimate is compared only for the real depth 76."""
    ours, kw = {}, (model_kwargs or {}).get("densenet_bc76", {})
    for r in runs:  # predicted FLOP saving of DenseNet-BC-76 (scaled and unscaled plan the same freeze steps)
        if r.get("network") == "densenet_bc76" and r["label"] != "baseline" and kw.get("depth", 76) == 76:
            key = ("flop_estimate", papers_freezeout.DENSENET_BC76, papers_freezeout.flop_column(r["spacing"], r["t0"]))
            if r["scaled"] or key not in ours:
                ours[key] = 100 * r["predicted_saving"]
    budget = {c.row: c.value for c in papers.cells("freezeout", "abstract") if c.metric == "accuracy_loss_pct"}
    for net, row in ABSTRACT_ROWS.items():
        mine = [r for r in runs if r.get("network") == net]
        base = [r["test_accuracy"] for r in mine if r["label"] == "baseline"]
        if not mine or not base or dataset != "cifar100":
            continue
        ref = 100 * sum(base) / len(base)
        ok = [(100 * r["measured_saving"], ref - 100 * r["test_accuracy"]) for r in mine
              if r["label"] != "baseline" and r["measured_saving"] is not None and ref - 100 * r["test_accuracy"] <= budget[row]]
        if ok:
            saving, loss = max(ok)
            ours[("abstract", row, "C100/best speedup")] = saving
            ours[("abstract", row, "C100/accuracy loss")] = loss
    return papers.side_by_side(papers.cells("freezeout"), ours)


def _pct(values: list, scale: float = 100.0) -> float:  # scale x the mean of the known values (NaN if none)
    known = [v for v in values if v is not None]
    return scale * report.mean_std(known)["mean"] if known else float("nan")


def _row(lab: str, rs: list[dict]) -> dict:
    return {"config": lab, "predicted saving %": 100 * rs[0]["predicted_saving"],
            "wall-time saving %": _pct([r["measured_saving"] for r in rs]), "CPU-time saving %": _pct([r["cpu_saving"] for r in rs]),
            "wall-time incl. compile %": _pct([r["measured_saving_with_compile"] for r in rs]),
            "test acc": report.fmt_mean_std([r["test_accuracy"] for r in rs], 100.0, 2), "stages": rs[0]["stages"],
            "train time s": _pct([r["train_s"] for r in rs], 1.0), "resumed": sum(r["resumed"] for r in rs)}


def _plot(path: str, runs: list[dict], title: str) -> str:
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


def main(argv=None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
