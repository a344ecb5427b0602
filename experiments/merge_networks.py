"""Merging two networks (Pašen & Boža 2022) against single-network baselines at equal budget.

    python experiments/merge_networks.py                  # tiny: width-0.5 CNN on digits, 3 seeds, CPU
    python experiments/merge_networks.py --preset paper   # ResNet-20 on CIFAR-100 (the authors' setting)
    python experiments/merge_networks.py --set seeds=(0,) --set baselines=()

Per seed: two teachers (T epochs each), the long teacher (2T + G + F epochs; and
FLOP-matched, 2T + 4G + F epochs), the teachers' ensemble (= big student at step 0), the big
student after G epochs of gate learning, the student right after compression, the merged
student after F epochs of fine-tuning, and the baselines: naive and permutation-aligned
(weight matching) weight averages of the teachers, with and without BatchNorm statistics
recomputed on the training set, and a double-width network trained from scratch for 2T epochs then gated,
compressed and fine-tuned exactly like the big student.
Cost is counted in epochs and in teacher-epoch FLOP units (a double-width epoch ~ 4 units).

Resumable units ``units/seed<k>/<stage>``: teacher_a, teacher_b, long_teacher,
long_teacher_flops, naive_average, aligned_average, gates, merged, double_width,
double_width_gates, double_width_pruned. Later units load the networks earlier ones saved.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import numpy as np

from mergejax import checkpoint, report
from mergejax import data as data_lib
from mergejax.averaging import average
from mergejax.config import TrainConfig, to_dict
from mergejax.experiment import experiment_main, unit
from mergejax.merging.concat import concat
from mergejax.merging.pipeline import (MergeConfig, big_model_kwargs, compress_stage, double_width, evaluate_vars, gate_stage,
                                       paper_config, seed_of, tiny_config)
from mergejax.models import make_model
from mergejax.rebasin import align
from mergejax.rundir import fingerprint_path
from mergejax.run import setup, train_and_evaluate
from mergejax.swa import recompute_batch_stats
from mergejax.train import model_apply_fn
from mergejax.units import unit_spec, variables_of

NAME = "merge_networks"
ORDER = 40


@dataclasses.dataclass(frozen=True)
class MergeExperiment:
    teacher: TrainConfig
    merge: MergeConfig  # its seed is unused: keys come from the experiment seed
    seeds: tuple = (0, 1, 2)
    baselines: tuple = ("long_teacher_flops", "naive_average", "aligned_average", "double_width_pruned")


def tiny() -> MergeExperiment:
    merge_cfg = tiny_config()  # width-0.5 SmallCNN on digits; see its docstring for lambda / gate lr
    teacher = TrainConfig(dataset="digits", model="cnn", model_kwargs=dict(merge_cfg.model_kwargs), batch_size=64,
                          epochs=6.0, lr=0.1, weight_decay=5e-4, schedule="cosine", log_every=22, checkpoint_every=220)
    return MergeExperiment(teacher, merge_cfg)


def paper() -> MergeExperiment:
    # fmfi-compbio/neural-network-merging, cifar100/: ResNet-20, SGD lr 0.1 momentum 0.9 wd 1e-4,
    # batch 128, teachers 200 epochs (x0.1 at 100, 150), gate stage 100 (weights x0.1 at 50, 70;
    # gates lr 0.2; lambda 0.05 + 0.05 sqrt(lambda) per epoch), fine-tune 100 (x0.1 at 50, 75);
    # long teacher 600 epochs (x0.1 at 300, 450). Pad-crop-flip augmentation.
    teacher = TrainConfig(dataset="cifar100", model="resnet20", batch_size=128, epochs=200, lr=0.1,
                          weight_decay=1e-4, schedule="step", step_boundaries=(0.5, 0.75), augment=True,
                          log_every=200, eval_every=0)
    return MergeExperiment(teacher, paper_config(), seeds=(0, 1, 2))


def smoke() -> MergeExperiment:
    """Seconds: checks the pipeline end to end (CI), not the method (half-epoch stages, one seed)."""
    merge_cfg = dataclasses.replace(tiny_config(), model_kwargs={"width": 0.25}, gate_epochs=0.5, finetune_epochs=0.5, log_every=11)
    teacher = TrainConfig(dataset="digits", model="cnn", model_kwargs={"width": 0.25}, batch_size=64, epochs=0.5, lr=0.1,
                          schedule="cosine", log_every=11)
    return MergeExperiment(teacher, merge_cfg, seeds=(0,))


PRESETS = {"tiny": tiny, "digits": tiny, "paper": paper, "smoke": smoke}

STAGES = [  # (key, label, epochs and teacher-epoch FLOP units, each as coefficients of (T, G, F))
    ("teacher", "teacher (one network)", (1, 0, 0), (1, 0, 0)),
    ("long_teacher", "long teacher (2T+G+F epochs)", (2, 1, 1), (2, 1, 1)),
    ("long_teacher_flops", "long teacher, FLOP-matched (2T+4G+F epochs)", (2, 4, 1), (2, 4, 1)),
    ("ensemble", "ensemble of 2 teachers = big student step 0", (2, 0, 0), (2, 0, 0)),
    ("naive_average", "naive weight average of the teachers", (2, 0, 0), (2, 0, 0)),
    ("naive_average_bn", "naive weight average, BN stats recomputed", (2, 0, 0), (2, 0, 0)),
    ("aligned_average", "permutation-aligned (weight matching) average", (2, 0, 0), (2, 0, 0)),
    ("aligned_average_bn", "aligned average, BN stats recomputed", (2, 0, 0), (2, 0, 0)),
    ("big_after_gates", "big student after gate learning", (2, 1, 0), (2, 4, 0)),
    ("after_compression", "student right after compression", (2, 1, 0), (2, 4, 0)),
    ("merged", "merged student after fine-tuning", (2, 1, 1), (2, 4, 1)),
    ("double_width_pruned", "double width from scratch (2T), gated, pruned, fine-tuned", (2, 1, 1), (8, 4, 1)),
]


def timed(fn):
    """A unit body that also records its own run time (``unit_time_s``)."""
    def run_(workdir):
        t0 = time.perf_counter()
        return {**fn(workdir), "unit_time_s": time.perf_counter() - t0}
    return run_


def trained(cfg: TrainConfig, train, test, progress: bool):
    """Unit body: train ``cfg`` in ``workdir/fit``, save ``{'params', 'batch_stats'}`` to ``workdir/variables``."""
    def fn(workdir):
        s = setup(cfg, train=train, test=test)
        state, summary = train_and_evaluate(cfg, os.path.join(workdir, "fit"), progress=progress, setup_=s)
        checkpoint.save(os.path.join(workdir, "variables"), variables_of(state.params, state.batch_stats), overwrite=True)
        return summary
    return fn


def averaged(model, path_a: str, path_b: str, aligned: bool, train, test):
    """Unit body: the (aligned) weight average of two saved networks, with its own and with
    recomputed BatchNorm statistics."""
    def fn(_):
        a, b = checkpoint.load(path_a), checkpoint.load(path_b)
        avg = average([a, align(unit_spec(model, a), a, b) if aligned else b])
        bn = {**avg, "batch_stats": recompute_batch_stats(model_apply_fn(model), avg["params"], avg["batch_stats"], train)}
        return {"plain": evaluate_vars(model, avg, test), "bn": evaluate_vars(model, bn, test)}
    return fn


def gated(big, model, paths: list, merge_cfg, key, train, test, progress: bool):
    """Unit body: gate learning on the concatenation of two saved networks (or on one saved
    double-width network); saves the result to ``workdir/gated``."""
    def fn(workdir):
        nets = [checkpoint.load(p) for p in paths]
        big_vars = concat(*nets, unit_spec(model, nets[0])) if len(nets) == 2 else nets[0]
        vars_, las, summary = gate_stage(big, big_vars, merge_cfg, train, test, key=key, workdir=workdir, progress=progress)
        checkpoint.save(os.path.join(workdir, "gated"), {"vars": vars_, "log_alphas": las}, overwrite=True)
        return summary
    return fn


def compressed(big, model, gated_path: str, merge_cfg, key, train, test, progress: bool, from_concat: bool):
    """Unit body: compress the saved gated network and fine-tune it."""
    def fn(workdir):
        g = checkpoint.load(gated_path)
        halves = {k: n // 2 for k, n in unit_spec(big, g["vars"]).groups.items()} if from_concat else None
        return compress_stage(big, model, g["vars"], g["log_alphas"], merge_cfg, train, test, key=key, workdir=workdir,
                              progress=progress, teacher_units=halves)[1]
    return fn


def run_seed(config: MergeExperiment, seed: int, train, test, out_dir: str, progress: bool) -> dict:
    T, G, F = config.teacher.epochs, config.merge.gate_epochs, config.merge.finetune_epochs
    names = ("teacher_a", "teacher_b", "long_teacher", "long_teacher_flops", "gates", "merged", "double_width",
             "double_width_gates", "double_width_pruned")
    keys = dict(zip(names, jax.random.split(jax.random.key(seed), len(names))))
    path = lambda name, item="variables": os.path.join(out_dir, "units", f"seed{seed}", name, item)  # noqa: E731

    def do(name, fn, cfg=None, after=()):  # one unit of this seed; ``after``: the units whose saved networks it reads
        inputs = {n: fingerprint_path(path(n, "gated" if n.endswith("gates") else "variables"))["hash"] for n in after}
        return unit(out_dir, f"seed{seed}/{name}", cfg or {"experiment": to_dict(config), "seed": seed}, timed(fn), inputs=inputs)

    def teacher(name, epochs, **kw):
        cfg = dataclasses.replace(config.teacher, seed=seed_of(keys[name]), epochs=epochs, **kw)
        return do(name, trained(cfg, train, test, progress), cfg)

    model = make_model(config.teacher.model, train.num_classes, **dict(config.teacher.model_kwargs))
    big, ab, mc = double_width(model), ("teacher_a", "teacher_b"), config.merge
    u = {"teacher_a": teacher("teacher_a", T), "teacher_b": teacher("teacher_b", T), "long_teacher": teacher("long_teacher", 2 * T + G + F)}
    if "long_teacher_flops" in config.baselines:
        u["long_teacher_flops"] = teacher("long_teacher_flops", 2 * T + 4 * G + F)
    for name in ("naive_average", "aligned_average"):
        if name in config.baselines:
            u[name] = do(name, averaged(model, *map(path, ab), name == "aligned_average", train, test), after=ab)
    u["gates"] = do("gates", gated(big, model, list(map(path, ab)), mc, keys["gates"], train, test, progress), after=ab)
    u["merged"] = do("merged", compressed(big, model, path("gates", "gated"), mc, keys["merged"], train, test, progress, True),
                     after=("gates",))
    if "double_width_pruned" in config.baselines:
        u["double_width"] = teacher("double_width", 2 * T, model_kwargs=big_model_kwargs(config.teacher.model_kwargs))
        u["double_width_gates"] = do("double_width_gates", gated(big, model, [path("double_width")], mc, keys["double_width_gates"],
                                                                 train, test, progress), after=("double_width",))
        u["double_width_pruned"] = do("double_width_pruned", compressed(big, model, path("double_width_gates", "gated"), mc,
                                                                        keys["double_width_pruned"], train, test, progress, False),
                                      after=("double_width_gates",))
    return {"seed": seed, "seeds": {n: seed_of(k) for n, k in keys.items()}, **_flat(u)}


def _flat(u: dict) -> dict:
    """The per-seed row of results.json from the unit results."""
    g, m = u["gates"], u["merged"]
    r = {"teacher_a": u["teacher_a"]["test_accuracy"], "teacher_b": u["teacher_b"]["test_accuracy"]}
    r["teacher"] = (r["teacher_a"] + r["teacher_b"]) / 2
    r.update({n: u[n]["test_accuracy"] for n in ("long_teacher", "long_teacher_flops") if n in u})
    r.update(ensemble=g["big_start"]["accuracy"], big_step0_gated=g["big_student_step0"]["accuracy"],
             big_after_gates=g["big_student_after_gates"]["accuracy"], after_compression=m["after_compression"]["accuracy"],
             merged=m["after_finetune"]["accuracy"], gate_binariness=g["gate_binariness"],
             gate_binariness_per_group=g["gate_binariness_per_group"], kept_from_teacher_a=m.get("kept_from_teacher_a"),
             gate_history=g["gate_history"], merge_time_s={**g["timing_s"], **m["timing_s"]})
    for n in ("naive_average", "aligned_average"):
        if n in u:
            r[n], r[n + "_bn"] = u[n]["plain"]["accuracy"], u[n]["bn"]["accuracy"]
    if "double_width_pruned" in u:
        p = u["double_width_pruned"]
        r.update(double_width_before_pruning=u["double_width"]["test_accuracy"], double_width_pruned=p["after_finetune"]["accuracy"],
                 double_width_after_compression=p["after_compression"]["accuracy"],
                 double_width_gate_binariness=u["double_width_gates"]["gate_binariness"])
    r["device_kind"] = u["teacher_a"]["device_kind"]
    r["wall_time_s"] = sum(x["unit_time_s"] for x in u.values())
    return r


def _plots(out_dir, runs, config):
    plt = report.pyplot()
    h = runs[0]["gate_history"]
    curves = {g: (h["step"], v) for g, v in h["prob_open"].items()}
    gate_plot = report.plot_curves(os.path.join(out_dir, "gate_open_probability.png"), curves, xlabel="gate-learning step",
                                   ylabel="mean P[g > 0] per group", title=f"gate open probability (seed {runs[0]['seed']})")
    keys = [k for k, *_ in STAGES if all(k in r for r in runs)]
    top = max(np.mean([r[k] for r in runs]) for k in keys)
    off = [k for k in keys if np.mean([r[k] for r in runs]) < top - 0.2]  # e.g. the naive average
    keys = [k for k in keys if k not in off]
    means = [np.mean([r[k] for r in runs]) for k in keys]
    stds = [np.std([r[k] for r in runs], ddof=1) if len(runs) > 1 else 0.0 for k in keys]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.errorbar(range(len(keys)), means, yerr=stds, fmt="o", capsize=4)
    for i, k in enumerate(keys):
        ax.scatter([i] * len(runs), [r[k] for r in runs], s=8, alpha=0.5, color="gray")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy")
    if off:
        ax.text(0.01, 0.02, "off scale: " + ", ".join(f"{k} {np.mean([r[k] for r in runs]):.3f}" for k in off),
                transform=ax.transAxes, fontsize=8)
    ax.set_title(f"{config.teacher.model} on {config.teacher.dataset}: accuracy per stage ({len(runs)} seeds)")
    ax.grid(alpha=0.3)
    return [gate_plot, report.save_figure(fig, os.path.join(out_dir, "accuracy_per_stage.png"))]


def _table(config: MergeExperiment, runs: list, device: str) -> tuple[str, dict, dict]:
    TGF = (config.teacher.epochs, config.merge.gate_epochs, config.merge.finetune_epochs)
    cost = lambda coef: f"{sum(c * x for c, x in zip(coef, TGF)):g}"  # noqa: E731
    rows, summary = [], {}
    for key, label, epochs, flops in STAGES:
        if all(key in r for r in runs):
            vals = [r[key] for r in runs]
            summary[key] = report.mean_std(vals)
            rows.append({"stage": label, "test accuracy (%)": report.fmt_mean_std(vals, 100.0), "epochs": cost(epochs),
                         "cost (teacher-epoch FLOPs)": cost(flops)})
    binar = {k: report.mean_std([r["gate_binariness"][k] for r in runs]) for k in runs[0]["gate_binariness"]}
    table = (f"`{config.teacher.model}` {dict(config.teacher.model_kwargs)} on `{config.teacher.dataset}`, "
             f"T={TGF[0]:g}, G={TGF[1]:g}, F={TGF[2]:g} epochs, {len(runs)} seeds (mean ± sample std); device: "
             f"{device}, {sum(r['wall_time_s'] for r in runs):.0f} s in all.\n\n" + report.markdown_table(rows))
    table += ("\nGates before compression (deterministic gate, pooled over groups, mean over seeds): "
              f"{100 * binar['frac_zero']['mean']:.1f}% exactly 0, {100 * binar['frac_one']['mean']:.1f}% exactly 1, "
              f"{100 * binar['frac_between']['mean']:.1f}% in between; mean distance to {{0,1}} "
              f"{binar['mean_dist_to_binary']['mean']:.4f}; mean P[g>0] {binar['mean_prob_open']['mean']:.3f}.\n")
    if all("double_width_before_pruning" in r for r in runs):
        table += ("Double-width baseline: " + report.fmt_mean_std([r["double_width_before_pruning"] for r in runs], 100.0)
                  + "% before pruning, " + report.fmt_mean_std([r["double_width_after_compression"] for r in runs], 100.0)
                  + "% right after compression.\n")
    return table, summary, binar


def run(config: MergeExperiment, out_dir: str, progress: bool = True) -> dict:
    train = data_lib.load(config.teacher.dataset, "train")
    test = data_lib.load(config.teacher.dataset, "test")
    runs = [run_seed(config, s, train, test, out_dir, progress) for s in config.seeds]
    table, summary, binar = _table(config, runs, runs[0]["device_kind"])
    plots = _plots(out_dir, runs, config)
    results = {"experiment": NAME, "config": to_dict(config), "summary": summary, "gate_binariness": binar,
               "runs": runs, "device_kind": runs[0]["device_kind"], "plots": [os.path.basename(p) for p in plots]}
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": plots}


def main(argv=None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
