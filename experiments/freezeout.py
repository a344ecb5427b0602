"""FreezeOut sweep: t0 x {linear, cubic} x {scaled, unscaled} against a no-freeze baseline;
predicted (XLA FLOP) saving, measured wall-clock saving and test accuracy.

    python experiments/freezeout.py                    # tiny: 7-layer MLP on digits, CPU, a few minutes
    python experiments/freezeout.py --preset paper     # Brock et al. 2017 setting, CIFAR-100 (GPU)
    python experiments/freezeout.py --set t0s=(0.5,0.8) --set max_stages=None
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

from mergejax import data as data_lib  # noqa: E402
from mergejax import freezeout as fo  # noqa: E402
from mergejax import report  # noqa: E402
from mergejax.config import TrainConfig, experiment_main, to_dict  # noqa: E402
from mergejax.models import init_variables, make_model  # noqa: E402
from mergejax.run import compilation_cache_dir, num_steps  # noqa: E402
from mergejax.train import create_state, evaluate, fit, make_optimizer  # noqa: E402

NAME = "freezeout"
ORDER = 30


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
    # meaningful prefix, small enough for the full 21-run sweep in well under a CPU minute (the
    # 7 stage steps are compiled once for the whole sweep). One seed: accuracy differences
    # below ~1% are noise here. Two timed trainings per point (minimum kept): interference on
    # a shared CPU only adds time.
    return FreezeOutConfig(
        TrainConfig(dataset="digits", model="mlp", model_kwargs={"hidden": (256,) * 6}, batch_size=128, steps=220,
                    lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4, log_every=220),
        repeats=2,
    )


def paper() -> FreezeOutConfig:
    # Brock et al. 2017 / ajbrock/FreezeOut train.py defaults: CIFAR-100, 100 epochs, batch 50,
    # SGD Nesterov 0.9, wd 1e-4, alpha(0) = 0.1, augmentation on. The authors' default network
    # is a DenseNet (not in mergejax); their WRN variant is the closest model here. Unlike the
    # authors' code (1000 iterations per epoch assumed), T is the real number of steps.
    return FreezeOutConfig(
        TrainConfig(dataset="cifar100", model="wrn", model_kwargs={"depth": 40, "widen": 4}, batch_size=50, epochs=100,
                    lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, augment=True, log_every=500),
        seeds=(0,),
    )


def paper_resnet() -> FreezeOutConfig:
    cfg = paper()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model="resnet56", model_kwargs={}))


def paper_vgg() -> FreezeOutConfig:
    cfg = paper()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model="vgg16", model_kwargs={}))


def smoke() -> FreezeOutConfig:
    """Seconds: checks the pipeline end to end (CI), not the method (one FreezeOut point)."""
    return FreezeOutConfig(
        TrainConfig(dataset="digits", model="mlp", model_kwargs={"hidden": (32,) * 3}, batch_size=128, steps=20,
                    lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4, log_every=20),
        t0s=(0.5,), spacings=("cubic",), scalings=(True,))


PRESETS = {"tiny": tiny, "digits": tiny, "paper": paper, "paper_resnet": paper_resnet, "paper_vgg": paper_vgg, "smoke": smoke}


class Runner:
    """One model, one optimizer and one compiled step per frozen prefix for the whole sweep:
    the FreezeOut schedule is data in the optimizer state, so a new plan needs no compile."""

    def __init__(self, cfg: TrainConfig, train, test, progress: bool):
        self.cfg, self.train, self.test, self.progress = cfg, train, test, progress
        self.model = make_model(cfg.model, train.num_classes, **dict(cfg.model_kwargs))
        self.total, _ = num_steps(cfg, len(train))
        template = fo.make_plan(self.model.layer_names(), self.total, t0=1.0)
        base = make_optimizer(cfg.optimizer, 1.0, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
        self.tx = fo.freezeout_tx(template, base)
        self.template = create_state(self.model, jax.random.key(0), (1, *train.images.shape[1:]), self.tx,
                                     augment_fn=data_lib.augment_cifar if cfg.augment else None)
        self.steps, self.costs = {}, {}

    def state(self, plan, seed):
        params, batch_stats = init_variables(self.model, jax.random.key(seed), (1, *self.train.images.shape[1:]))
        return self.template.replace(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                                     opt_state=fo.with_plan(self.tx.init(params), plan))

    def __call__(self, *, seed: int, t0: float, spacing: str, scaled: bool, max_stages, repeats: int = 1) -> dict:
        """Build the plan, compile the stages not compiled yet (timed), print the cost model, train, evaluate."""
        cfg = self.cfg
        plan = fo.make_plan(self.model.layer_names(), self.total, lr=cfg.lr, t0=t0, spacing=spacing, scaled=scaled,
                            max_stages=max_stages)
        state = self.state(plan, seed)
        sample = jax.device_put(next(data_lib.batches(self.train, cfg.batch_size, seed=seed, remainder=cfg.remainder)))
        new = {0, *(k for _, k in plan.stages)} - set(self.steps)
        t = time.perf_counter()
        self.steps, self.costs = fo.compile_stages(plan, state, sample, jax.random.key(0), self.steps, self.costs)
        compile_s = time.perf_counter() - t
        # Compile time of a run on its own (no sharing): every stage it uses.
        own_compile_s = sum(self.costs[k]["compile_s"] for k in {0, *(k for _, k in plan.stages)})
        label = "baseline" if t0 >= 1.0 else f"t0={t0} {spacing} {'scaled' if scaled else 'unscaled'}"
        if self.progress:
            print(f"-- {label} (seed {seed}; compiled {len(new)} new stage(s) in {compile_s:.1f}s)\n{fo.cost_report(plan, self.costs)}", flush=True)
        train_s = cpu_s = float("inf")
        for r in range(repeats):
            state = self.state(plan, seed) if r else state
            t, c = time.perf_counter(), time.process_time()
            state, history = fit(state, self.train, num_steps=self.total, batch_size=cfg.batch_size, seed=seed, log_every=self.total,
                                 remainder=cfg.remainder, step_fn=fo.staged_step_fn(plan, self.steps), progress=False)
            train_s, cpu_s = min(train_s, time.perf_counter() - t), min(cpu_s, time.process_time() - c)
        final = evaluate(state, self.test, cfg.eval_batch_size)
        return {
            "label": label, "t0": t0, "spacing": spacing, "scaled": scaled, "seed": seed,
            "predicted_saving": fo.predict_saving(plan, self.costs)["saving"],
            "train_s": train_s, "cpu_s": cpu_s, "compile_s": own_compile_s, "stages": len(plan.stages),
            "freeze_steps": list(plan.freeze_steps), "stage_prefixes": [k for _, k in plan.stages],
            "test_accuracy": final["accuracy"], "test_loss": final["loss"], "train_loss": history[-1]["loss"],
        }


def run(config: FreezeOutConfig, out_dir: str, progress: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    cfg0 = config.train
    train, test = data_lib.load(cfg0.dataset, "train"), data_lib.load(cfg0.dataset, "test")
    runner = Runner(cfg0, train, test, progress)
    runs = []
    for seed in config.seeds:
        kw = dict(seed=seed, max_stages=config.max_stages, repeats=config.repeats)
        # The baseline runs first, after every `baseline_every` points and last; each point is
        # compared with the baseline interpolated to its place in the sequence, so a shared
        # machine's drifting speed does not shift every point.
        points = [(t0, sp, sc) for t0 in config.t0s for sp in config.spacings for sc in config.scalings]
        runs.append(runner(t0=1.0, spacing="linear", scaled=False, **kw))
        for i, (t0, spacing, scaled) in enumerate(points, 1):
            runs.append(runner(t0=t0, spacing=spacing, scaled=scaled, **kw))
            if config.baseline_every and i % config.baseline_every == 0 and i < len(points):
                runs.append(runner(t0=1.0, spacing="linear", scaled=False, **kw))
        runs.append(runner(t0=1.0, spacing="linear", scaled=False, **kw))
    stage_costs = {str(k): v for k, v in sorted(runner.costs.items())}
    for i, r in enumerate(runs):
        r["order"] = i
    for seed in config.seeds:
        mine = [r for r in runs if r["seed"] == seed]
        base = [r for r in mine if r["label"] == "baseline"]
        at = [r["order"] for r in base]

        def ref(r, key):
            # the baseline's time where this run was timed: linear between the baselines timed
            # before and after it, which removes the slow drift of a shared machine's speed
            return float(np.interp(r["order"], at, [key(b) for b in base]))

        for r in mine:
            r["baseline_ref_s"] = ref(r, lambda b: b["train_s"])
            r["measured_saving"] = 1.0 - r["train_s"] / r["baseline_ref_s"]
            r["cpu_saving"] = 1.0 - r["cpu_s"] / ref(r, lambda b: b["cpu_s"])
            r["measured_saving_with_compile"] = 1.0 - (r["train_s"] + r["compile_s"]) / ref(r, lambda b: b["train_s"] + b["compile_s"])
    rows = []
    labels = list(dict.fromkeys(r["label"] for r in runs))
    for label in labels:
        rs = [r for r in runs if r["label"] == label]
        rows.append({
            "config": label,
            "predicted saving %": 100 * rs[0]["predicted_saving"],
            "wall saving %": 100 * report.mean_std([r["measured_saving"] for r in rs])["mean"],
            "CPU-time saving %": 100 * report.mean_std([r["cpu_saving"] for r in rs])["mean"],
            "wall incl. compile %": 100 * report.mean_std([r["measured_saving_with_compile"] for r in rs])["mean"],
            "test acc": report.fmt_mean_std([r["test_accuracy"] for r in rs], 100.0, 2),
            "stages": rs[0]["stages"],
            "train s": report.mean_std([r["train_s"] for r in rs])["mean"],
        })
    device = jax.devices()[0].device_kind
    cache = compilation_cache_dir()
    table = (f"FreezeOut on `{cfg0.dataset}` with `{cfg0.model}` {dict(cfg0.model_kwargs)}, {runs[0]['freeze_steps'][-1]} steps, "
             f"batch {cfg0.batch_size}, alpha(0) = {cfg0.lr}, max_stages = {config.max_stages}, seeds {list(config.seeds)}, "
             f"device {device}. Saving = 1 - time / baseline time of the training loop, compile excluded unless "
             f"stated (min over {config.repeats} timed run(s) per point; baseline timed first, after every {config.baseline_every} points and last, and interpolated to each point's place in the sequence); wall = wall-clock, CPU = process CPU time "
             f"(all threads; the steadier number on a shared machine); 'wall incl. compile' charges each run the "
             f"compile time of all the stages it uses; predicted = from XLA cost-analysis FLOPs per compiled stage."
             + (f" Persistent compilation cache on (`{cache}`): on a re-run, compile times are cache loads." if cache else "")
             + "\n\n")
    table += report.markdown_table(rows, floatfmt=".2f")
    plot = _plot(os.path.join(out_dir, "speed_vs_accuracy.png"), runs, cfg0)
    results = {"experiment": NAME, "config": to_dict(config), "device_kind": device, "compilation_cache": cache, "rows": rows, "runs": runs,
               "stage_costs": stage_costs, "total_steps": runner.total,
               "plots": [os.path.basename(plot)]}
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": [plot]}


def _plot(path: str, runs: list[dict], cfg: TrainConfig) -> str:
    plt = report.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {("linear", True): ("tab:blue", "o"), ("linear", False): ("tab:cyan", "s"),
              ("cubic", True): ("tab:red", "^"), ("cubic", False): ("tab:orange", "v"), ("squared", True): ("tab:green", "D"),
              ("squared", False): ("tab:olive", "d")}
    for key, (color, marker) in styles.items():
        rs = [r for r in runs if r["label"] != "baseline" and (r["spacing"], r["scaled"]) == key]
        if not rs:
            continue
        name = f"{key[0]} {'scaled' if key[1] else 'unscaled'}"
        ax1.scatter([100 * r["measured_saving"] for r in rs], [100 * r["test_accuracy"] for r in rs], c=color, marker=marker, label=name)
        ax2.scatter([100 * r["predicted_saving"] for r in rs], [100 * r["measured_saving"] for r in rs], c=color, marker=marker, label=f"{name} (wall)")
        ax2.scatter([100 * r["predicted_saving"] for r in rs], [100 * r["cpu_saving"] for r in rs], facecolors="none", edgecolors=color,
                    marker=marker, label=f"{name} (CPU time)")
        for r in rs:
            ax1.annotate(f"{r['t0']}", (100 * r["measured_saving"], 100 * r["test_accuracy"]), fontsize=7)
    base = [r for r in runs if r["label"] == "baseline"]
    ax1.scatter([100 * r["measured_saving"] for r in base], [100 * r["test_accuracy"] for r in base], c="k", marker="*", s=90, label="no freeze")
    ax1.set(xlabel="measured wall-clock saving (%)", ylabel="test accuracy (%)", title=f"{cfg.model} on {cfg.dataset}")
    hi = max([100 * r["predicted_saving"] for r in runs] + [1.0])
    ax2.plot([0, hi], [0, hi], "k--", lw=0.8, label="measured = predicted")
    ax2.set(xlabel="predicted FLOP saving (%)", ylabel="measured saving (%)", title="cost model vs clock")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    return report.save_figure(fig, path)


def main(argv=None):
    experiment_main(argv, PRESETS, NAME, __doc__, run)


if __name__ == "__main__":
    main()
