"""FreezeOut sweep: t0 x {linear, cubic} x {scaled, unscaled} against a no-freeze baseline;
predicted (XLA FLOP) saving, measured wall-clock saving and test accuracy.

    python experiments/freezeout.py                    # tiny: 7-layer MLP on digits, CPU, a few minutes
    python experiments/freezeout.py --preset paper     # Brock et al. 2017 setting, CIFAR-100 (GPU)
    python experiments/freezeout.py --set t0s=(0.5,0.8) --set max_stages=None

Every timed training (each sweep point, each timing of the baseline) is a resumable unit
``units/seed<k>/<position>-<point>`` (checkpoints in its ``fit/``). A unit resumed from a
checkpoint reports the time of its resumed part only (``resumed: true``; flagged in the table).
"""

from __future__ import annotations

import dataclasses
import os
import sys

from mergejax import freezeout as fo
from mergejax import report
from mergejax.config import TrainConfig, to_dict
from mergejax.experiment import experiment_main, unit
from mergejax.run import compilation_cache_dir

NAME = "freezeout"
ORDER = 30
BASELINE = (1.0, "linear", False)  # t0 = 1 freezes nothing


@dataclasses.dataclass(frozen=True)
class FreezeOutConfig:
    train: TrainConfig  # lr = alpha(0); schedule/model as in the baseline (the schedule field is unused)
    t0s: tuple = (0.5, 0.6, 0.7, 0.8, 0.9)
    spacings: tuple = ("linear", "cubic")
    scalings: tuple = (True, False)
    max_stages: int | None = None  # bound on compiled steps per run (None: one per layer)
    seeds: tuple = (0,)
    repeats: int = 1  # timed trainings per point (identical results); the minimum time is reported
    baseline_every: int = 4  # re-time the no-freeze baseline after every this many points (0: first and last only)


def tiny() -> FreezeOutConfig:
    # 7-layer MLP (6 x Dense-256 + head) on digits, 220 steps (~20 epochs): deep enough for a
    # meaningful prefix. One seed: accuracy differences below ~1% are noise here. Two timed
    # trainings per point (minimum kept): interference on a shared CPU only adds time. One
    # checkpoint, at the end: a unit is ~1 s, and a save inside the loop would be timed.
    return FreezeOutConfig(
        TrainConfig(dataset="digits", model="mlp", model_kwargs={"hidden": (256,) * 6}, batch_size=128, steps=220,
                    lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4, log_every=220, checkpoint_every=220),
        repeats=2,
    )


def paper() -> FreezeOutConfig:
    # Brock et al. 2017 / ajbrock/FreezeOut train.py defaults: CIFAR-100, 100 epochs, batch 50,
    # SGD Nesterov 0.9, wd 1e-4, alpha(0) = 0.1, augmentation on. The authors' default network
    # is a DenseNet (not in mergejax); their WRN variant is the closest model here. Unlike the
    # authors' code (1000 iterations per epoch assumed), T is the real number of steps.
    # checkpoint_every is a multiple of log_every, so a resumed unit logs the same losses.
    return FreezeOutConfig(
        TrainConfig(dataset="cifar100", model="wrn", model_kwargs={"depth": 40, "widen": 4}, batch_size=50, epochs=100,
                    lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, augment=True, log_every=500,
                    checkpoint_every=5000),
        seeds=(0,),
    )


def paper_resnet() -> FreezeOutConfig:
    cfg = paper()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model="resnet56", model_kwargs={}))


def paper_vgg() -> FreezeOutConfig:
    cfg = paper()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model="vgg16", model_kwargs={}))


def smoke() -> FreezeOutConfig:
    """Seconds: checks the pipeline end to end (CI), not the method (one FreezeOut point).
    A checkpoint mid-training, so an interrupted smoke run exercises the resume."""
    return FreezeOutConfig(
        TrainConfig(dataset="digits", model="mlp", model_kwargs={"hidden": (32,) * 3}, batch_size=128, steps=20,
                    lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4, log_every=10, checkpoint_every=10),
        t0s=(0.5,), spacings=("cubic",), scalings=(True,))


PRESETS = {"tiny": tiny, "digits": tiny, "paper": paper, "paper_resnet": paper_resnet, "paper_vgg": paper_vgg, "smoke": smoke}


def timing_sequence(config: FreezeOutConfig) -> list[tuple]:
    """The points of one seed in timing order: the baseline first, after every
    ``baseline_every`` points and last, so each point has a baseline timed near it."""
    points = [(t0, sp, sc) for t0 in config.t0s for sp in config.spacings for sc in config.scalings]
    seq = [BASELINE]
    for i, p in enumerate(points, 1):
        seq.append(p)
        if config.baseline_every and i % config.baseline_every == 0 and i < len(points):
            seq.append(BASELINE)
    return seq + [BASELINE]


def label(point: tuple) -> str:
    t0, spacing, scaled = point
    return "baseline" if point == BASELINE else f"t0={t0} {spacing} {'scaled' if scaled else 'unscaled'}"


def run(config: FreezeOutConfig, out_dir: str, progress: bool = True) -> dict:
    runs, stages = [], {}  # stages: compiled steps shared by the sweep
    for seed in config.seeds:
        cfg = dataclasses.replace(config.train, seed=seed)
        for j, point in enumerate(timing_sequence(config)):
            t0, spacing, scaled = point
            name = f"seed{seed}/{j:02d}-" + label(point).replace("=", "_").replace(" ", "-")
            ucfg = {"train": to_dict(cfg), "t0": t0, "spacing": spacing, "scaled": scaled,
                    "max_stages": config.max_stages, "repeats": config.repeats}

            def fn(workdir):
                if progress:
                    print(f"-- {name}", flush=True)
                return {"label": label(point), **fo.train_and_evaluate(
                    cfg, t0=t0, spacing=spacing, scaled=scaled, max_stages=config.max_stages,
                    workdir=os.path.join(workdir, "fit"), repeats=config.repeats, manifest=ucfg, progress=progress,
                    stages=stages)}

            runs.append({**unit(out_dir, name, ucfg, fn), "unit": name})
    runs = fo.compare_with_baselines([{**r, "order": i} for i, r in enumerate(runs)], lambda r: r["label"] == "baseline")
    rows = [_row(lab, [r for r in runs if r["label"] == lab]) for lab in dict.fromkeys(r["label"] for r in runs)]
    stage_costs = {k: c for r in runs for k, c in r["stage_costs"].items()}
    resumed = [r["unit"] for r in runs if r["resumed"]]  # their times cover the resumed part only
    cache = compilation_cache_dir()
    cfg0 = config.train
    table = (f"FreezeOut on `{cfg0.dataset}` with `{cfg0.model}` {dict(cfg0.model_kwargs)}, {runs[0]['total_steps']} steps, "
             f"batch {cfg0.batch_size}, alpha(0) = {cfg0.lr}, max_stages = {config.max_stages}, seeds {list(config.seeds)}, "
             f"device {runs[0]['device_kind']}. Saving = 1 - time / baseline time of the training loop, compile excluded unless "
             f"stated (min over {config.repeats} timed run(s) per point; baseline timed first, after every {config.baseline_every} "
             f"points and last, and interpolated to each point's place in the sequence); wall = wall-clock, CPU = process CPU time "
             f"(all threads; the steadier number on a shared machine); 'wall-time incl. compile' charges each run the "
             f"time it took to get all the stages it uses (compile, or a load from the persistent compilation cache); "
             f"predicted = from XLA cost-analysis FLOPs per compiled stage."
             + (f" Persistent compilation cache on (`{cache}`)." if cache else "")
             + (f" **Resumed from a checkpoint (times cover the resumed part only):** {', '.join(resumed)}." if resumed else "")
             + "\n\n") + report.markdown_table(rows, floatfmt=".2f")
    plot = _plot(os.path.join(out_dir, "speed_vs_accuracy.png"), runs, cfg0)
    results = {"experiment": NAME, "config": to_dict(config), "device_kind": runs[0]["device_kind"], "compilation_cache": cache,
               "rows": rows, "runs": runs, "stage_costs": stage_costs, "total_steps": runs[0]["total_steps"],
               "units_timed_after_resume": resumed, "plots": [os.path.basename(plot)]}
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": [plot]}


def _mean(values: list, scale: float = 100.0) -> float:
    """``scale`` x the mean of the values that are known (NaN if none)."""
    known = [v for v in values if v is not None]
    return scale * report.mean_std(known)["mean"] if known else float("nan")


def _row(lab: str, rs: list[dict]) -> dict:
    return {"config": lab, "predicted saving %": 100 * rs[0]["predicted_saving"],
            "wall-time saving %": _mean([r["measured_saving"] for r in rs]), "CPU-time saving %": _mean([r["cpu_saving"] for r in rs]),
            "wall-time incl. compile %": _mean([r["measured_saving_with_compile"] for r in rs]),
            "test acc": report.fmt_mean_std([r["test_accuracy"] for r in rs], 100.0, 2), "stages": rs[0]["stages"],
            "train time s": _mean([r["train_s"] for r in rs], 1.0), "resumed": sum(r["resumed"] for r in rs)}


def _plot(path: str, runs: list[dict], cfg: TrainConfig) -> str:
    plt = report.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {("linear", True): ("tab:blue", "o"), ("linear", False): ("tab:cyan", "s"), ("cubic", True): ("tab:red", "^"),
              ("cubic", False): ("tab:orange", "v"), ("squared", True): ("tab:green", "D"), ("squared", False): ("tab:olive", "d")}
    timed = [r for r in runs if r["measured_saving"] is not None]
    for (spacing, scaled), (color, marker) in styles.items():
        rs = [r for r in timed if r["label"] != "baseline" and (r["spacing"], r["scaled"]) == (spacing, scaled)]
        if rs:
            name = f"{spacing} {'scaled' if scaled else 'unscaled'}"
            pred, wall = [100 * r["predicted_saving"] for r in rs], [100 * r["measured_saving"] for r in rs]
            ax1.scatter(wall, [100 * r["test_accuracy"] for r in rs], c=color, marker=marker, label=name)
            ax2.scatter(pred, wall, c=color, marker=marker, label=f"{name} (wall)")
            ax2.scatter(pred, [100 * r["cpu_saving"] for r in rs], facecolors="none", edgecolors=color, marker=marker,
                        label=f"{name} (CPU time)")
            for r, x in zip(rs, wall):
                ax1.annotate(f"{r['t0']}", (x, 100 * r["test_accuracy"]), fontsize=7)
    base = [r for r in timed if r["label"] == "baseline"]
    ax1.scatter([100 * r["measured_saving"] for r in base], [100 * r["test_accuracy"] for r in base], c="k", marker="*", s=90, label="no freeze")
    ax1.set(xlabel="measured wall-clock saving (%)", ylabel="test accuracy (%)", title=f"{cfg.model} on {cfg.dataset}")
    hi = max([100 * r["predicted_saving"] for r in runs] + [1.0])
    ax2.plot([0, hi], [0, hi], "k--", lw=0.8, label="measured = predicted")
    ax2.set(xlabel="predicted FLOP saving (%)", ylabel="measured saving (%)", title="cost model vs clock")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    return report.save_figure(fig, path)


def main(argv=None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
