"""FreezeOut sweep: t0 x {linear, cubic} x {scaled, unscaled} against a no-freeze baseline;
predicted (XLA FLOP) saving, measured wall-clock saving and test accuracy.

    python experiments/freezeout.py                    # tiny: 7-layer MLP on digits, CPU, a few minutes
    python experiments/freezeout.py --preset paper     # Brock et al. 2017 setting, CIFAR-100 (GPU)
    python experiments/freezeout.py --set t0s=(0.5,0.8) --set max_stages=2

Every timed training (sweep point or baseline timing) is a resumable unit ``units/seed<k>/<position>-<point>``
(checkpoints in its ``fit/``); a resumed unit reports the time of its resumed part only (flagged in the table).
"""

from __future__ import annotations

import os
import sys

import ml_collections

from mergejax import freezeout as fo
from mergejax import report
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
PAPER_MODELS = {"paper": ("wrn", {"depth": 40, "widen": 4}), "paper_resnet": ("resnet56", {}), "paper_vgg": ("vgg16", {})}


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    """``train``: one training (``lr`` = alpha(0); its ``schedule`` is unused) and the sweep around it."""
    sgd = dict(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=1e-4)
    c = ml_collections.ConfigDict()
    if preset in PAPER_MODELS:
        # Brock et al. 2017 / ajbrock/FreezeOut train.py defaults: CIFAR-100, 100 epochs, batch 50,
        # SGD Nesterov 0.9, wd 1e-4, alpha(0) = 0.1, augmentation on. The authors' default network
        # is a DenseNet (not in mergejax); their WRN variant is the closest model here. Unlike the
        # authors' code (1000 iterations per epoch assumed), T is the real number of steps.
        # checkpoint_every is a multiple of log_every, so a resumed unit logs the same losses.
        model, kwargs = PAPER_MODELS[preset]
        c.train = train_config(dataset="cifar100", model=model, model_kwargs=kwargs, batch_size=50, epochs=100.0, lr=0.1,
                               augment=True, log_every=500, checkpoint_every=5000, **sgd)
    elif preset == "smoke":
        # Seconds: the pipeline end to end (CI), not the method; a mid-run checkpoint exercises the resume.
        c.train = train_config(dataset="digits", model="mlp", model_kwargs={"hidden": (32,) * 3}, batch_size=128, steps=20,
                               lr=0.05, log_every=10, checkpoint_every=10, **sgd)
    else:
        # tiny: 7 layers, ~20 epochs: a meaningful prefix; accuracy differences below ~1% are noise. One
        # checkpoint, at the end: a unit is ~1 s and a save inside the loop would be timed.
        c.train = train_config(dataset="digits", model="mlp", model_kwargs={"hidden": (256,) * 6}, batch_size=128, steps=220,
                               lr=0.05, log_every=220, checkpoint_every=220, **sgd)
    smoke = preset == "smoke"
    c.t0s = (0.5,) if smoke else (0.5, 0.6, 0.7, 0.8, 0.9)
    c.spacings = ("cubic",) if smoke else ("linear", "cubic")
    c.scalings = (True,) if smoke else (True, False)
    c.max_stages = placeholder(int)  # bound on compiled steps per run (None: one per layer)
    c.seeds = (0,)
    # timed trainings per point (identical results; the minimum time is kept: interference only adds time)
    c.repeats = 2 if preset in ("tiny", "digits") else 1
    c.baseline_every = 4  # re-time the no-freeze baseline after every this many points (0: first and last only)
    return c


def run(config: ml_collections.ConfigDict, out_dir: str, progress: bool = True) -> dict:
    tc = config.train
    train, test = data_lib.load(tc.dataset, "train"), data_lib.load(tc.dataset, "test")
    model = make_model(tc.model, train.num_classes, **to_dict(tc.model_kwargs))
    total, _ = num_steps(tc, len(train))
    # unit rate: FreezeOut sets each layer's
    base = make_optimizer(tc.optimizer, 1.0, momentum=tc.momentum, nesterov=tc.nesterov, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)
    loop = dict(total_steps=total, batch_size=tc.batch_size, lr=tc.lr, max_stages=config.max_stages,
                augment_fn=data_lib.augment_cifar if tc.augment else None, remainder=tc.remainder, log_every=tc.log_every,
                checkpoint_every=tc.checkpoint_every, eval_batch_size=tc.eval_batch_size, repeats=config.repeats,
                progress=progress, cache={})  # cache: compiled stages shared by the sweep
    points = [(t0, sp, sc) for t0 in config.t0s for sp in config.spacings for sc in config.scalings]
    runs = []
    for seed in config.seeds:
        for j, point in enumerate(fo.timing_sequence(points, config.baseline_every)):
            t0, spacing, scaled = point
            name = f"seed{seed}/{j:02d}-" + fo.point_label(point).replace("=", "_").replace(" ", "-")
            ucfg = {"train": to_dict(replace(tc, seed=seed)), "t0": t0, "spacing": spacing, "scaled": scaled,
                    "max_stages": config.max_stages, "repeats": config.repeats}

            def fn(workdir):
                if progress:
                    print(f"-- {name}", flush=True)
                return {"label": fo.point_label(point), **fo.train_and_evaluate(
                    model, train, test, base, t0=t0, spacing=spacing, scaled=scaled, seed=seed,
                    workdir=os.path.join(workdir, "fit"), manifest=ucfg, **loop)}

            runs.append({**unit(out_dir, name, ucfg, fn), "unit": name})
    runs = fo.compare_with_baselines([{**r, "order": i} for i, r in enumerate(runs)], lambda r: r["label"] == "baseline")
    rows = [_row(lab, [r for r in runs if r["label"] == lab]) for lab in dict.fromkeys(r["label"] for r in runs)]
    resumed = [r["unit"] for r in runs if r["resumed"]]  # their times cover the resumed part only
    cache = compilation_cache_dir()
    table = (f"FreezeOut on `{tc.dataset}` with `{tc.model}` {to_dict(tc.model_kwargs)}, {total} steps, batch {tc.batch_size}, "
             f"alpha(0) = {tc.lr}, max_stages = {config.max_stages}, seeds {list(config.seeds)}, device {runs[0]['device_kind']}. "
             f"Saving = 1 - loop time / baseline loop time, compile excluded unless stated (min of {config.repeats} timed run(s); "
             f"baselines timed first, every {config.baseline_every} points and last, interpolated to each point's place); CPU = "
             f"process CPU time (steadier on a shared machine); 'incl. compile' adds the time to get the run's stages (compile or "
             f"persistent-cache load); predicted = from XLA cost-analysis FLOPs per compiled stage."
             + (f" Persistent compilation cache on (`{cache}`)." if cache else "")
             + (f" **Resumed from a checkpoint (times cover the resumed part only):** {', '.join(resumed)}." if resumed else "")
             + "\n\n") + report.markdown_table(rows, floatfmt=".2f")
    plot = _plot(os.path.join(out_dir, "speed_vs_accuracy.png"), runs, f"{tc.model} on {tc.dataset}")
    results = {"experiment": NAME, "config": to_dict(config), "device_kind": runs[0]["device_kind"], "compilation_cache": cache,
               "rows": rows, "runs": runs, "stage_costs": {k: c for r in runs for k, c in r["stage_costs"].items()},
               "total_steps": total, "units_timed_after_resume": resumed, "plots": [os.path.basename(plot)]}
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": [plot]}


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
