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
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mergejax import data as data_lib  # noqa: E402
from mergejax import report  # noqa: E402
from mergejax.config import TrainConfig, experiment_main, to_dict  # noqa: E402
from mergejax.merging.pipeline import MergeConfig, big_model_kwargs, evaluate_vars, merge, paper_config, shrink, tiny_config  # noqa: E402
from mergejax.models import make_model  # noqa: E402
from mergejax.run import setup, train_and_evaluate  # noqa: E402
from mergejax.units import variables_of  # noqa: E402

NAME = "merge_networks"
ORDER = 40


@dataclasses.dataclass(frozen=True)
class MergeExperiment:
    teacher: TrainConfig
    merge: MergeConfig
    seeds: tuple = (0, 1, 2)
    baselines: tuple = ("long_teacher_flops", "naive_average", "aligned_average", "double_width_pruned")


def tiny() -> MergeExperiment:
    merge_cfg = tiny_config()  # width-0.5 SmallCNN on digits; see its docstring for lambda / gate lr
    teacher = TrainConfig(dataset="digits", model="cnn", model_kwargs=dict(merge_cfg.model_kwargs), batch_size=64,
                          epochs=6.0, lr=0.1, weight_decay=5e-4, schedule="cosine", log_every=22)
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

STAGES = [  # (key, label, epochs(T, G, F), teacher-epoch FLOP units(T, G, F))
    ("teacher", "teacher (one network)", lambda T, G, F: T, lambda T, G, F: T),
    ("long_teacher", "long teacher (2T+G+F epochs)", lambda T, G, F: 2 * T + G + F, lambda T, G, F: 2 * T + G + F),
    ("long_teacher_flops", "long teacher, FLOP-matched (2T+4G+F epochs)", lambda T, G, F: 2 * T + 4 * G + F,
     lambda T, G, F: 2 * T + 4 * G + F),
    ("ensemble", "ensemble of 2 teachers = big student step 0", lambda T, G, F: 2 * T, lambda T, G, F: 2 * T),
    ("naive_average", "naive weight average of the teachers", lambda T, G, F: 2 * T, lambda T, G, F: 2 * T),
    ("naive_average_bn", "naive weight average, BN stats recomputed", lambda T, G, F: 2 * T, lambda T, G, F: 2 * T),
    ("aligned_average", "permutation-aligned (weight matching) average", lambda T, G, F: 2 * T, lambda T, G, F: 2 * T),
    ("aligned_average_bn", "aligned average, BN stats recomputed", lambda T, G, F: 2 * T, lambda T, G, F: 2 * T),
    ("big_after_gates", "big student after gate learning", lambda T, G, F: 2 * T + G, lambda T, G, F: 2 * T + 4 * G),
    ("after_compression", "student right after compression", lambda T, G, F: 2 * T + G, lambda T, G, F: 2 * T + 4 * G),
    ("merged", "merged student after fine-tuning", lambda T, G, F: 2 * T + G + F, lambda T, G, F: 2 * T + 4 * G + F),
    ("double_width_pruned", "double width from scratch (2T), gated, pruned, fine-tuned",
     lambda T, G, F: 2 * T + G + F, lambda T, G, F: 8 * T + 4 * G + F),
]


def _teacher(cfg: TrainConfig, seed: int, train, test, progress):
    cfg = dataclasses.replace(cfg, seed=seed)
    s = setup(cfg, train=train, test=test)
    state, summary = train_and_evaluate(cfg, None, progress=progress, setup_=s)  # in memory, no checkpoints
    return variables_of(jax.device_get(state.params), jax.device_get(state.batch_stats)), summary


def run_seed(config: MergeExperiment, seed: int, train, test, progress: bool) -> dict:
    T, G, F = config.teacher.epochs, config.merge.gate_epochs, config.merge.finetune_epochs
    base = 100 * seed
    res: dict = {"seed": seed}
    t0 = time.perf_counter()
    va, sa = _teacher(config.teacher, base + 1, train, test, progress)
    vb, sb = _teacher(config.teacher, base + 2, train, test, progress)
    res["teacher_a"], res["teacher_b"] = sa["test_accuracy"], sb["test_accuracy"]
    res["teacher"] = (sa["test_accuracy"] + sb["test_accuracy"]) / 2
    long_cfg = dataclasses.replace(config.teacher, epochs=2 * T + G + F)
    _, sl = _teacher(long_cfg, base + 3, train, test, progress)
    res["long_teacher"] = sl["test_accuracy"]
    if "long_teacher_flops" in config.baselines:
        _, sf = _teacher(dataclasses.replace(config.teacher, epochs=2 * T + 4 * G + F), base + 5, train, test, progress)
        res["long_teacher_flops"] = sf["test_accuracy"]
    mcfg = dataclasses.replace(config.merge, seed=base)
    _, sm = merge(va, vb, mcfg, train, test, progress=progress)
    res["ensemble"] = sm["big_start"]["accuracy"]
    res["big_step0_gated"] = sm["big_student_step0"]["accuracy"]
    res["big_after_gates"] = sm["big_student_after_gates"]["accuracy"]
    res["after_compression"] = sm["after_compression"]["accuracy"]
    res["merged"] = sm["after_finetune"]["accuracy"]
    res["gate_binariness"] = sm["gate_binariness"]
    res["gate_binariness_per_group"] = sm["gate_binariness_per_group"]
    res["kept_from_teacher_a"] = sm.get("kept_from_teacher_a")
    res["gate_history"] = sm["gate_history"]
    res["merge_timing_s"] = sm["timing_s"]
    model = make_model(config.teacher.model, train.num_classes, **dict(config.teacher.model_kwargs))
    if {"naive_average", "aligned_average"} & set(config.baselines):
        # The averaging work (mergejax.averaging, .rebasin, .swa); imported here so the merge
        # pipeline itself does not depend on it.
        from mergejax.averaging import average
        from mergejax.rebasin import align
        from mergejax.swa import recompute_batch_stats
        from mergejax.train import model_apply_fn
        from mergejax.units import unit_spec

        def with_bn(v):  # BatchNorm statistics re-estimated on the training set (SWA-style)
            return {**v, "batch_stats": recompute_batch_stats(model_apply_fn(model), v["params"], v["batch_stats"], train)}

        if "naive_average" in config.baselines:
            avg = average([va, vb])
            res["naive_average"] = evaluate_vars(model, avg, test)["accuracy"]
            res["naive_average_bn"] = evaluate_vars(model, with_bn(avg), test)["accuracy"]
        if "aligned_average" in config.baselines:
            avg = average([va, align(unit_spec(model, va), va, vb)])
            res["aligned_average"] = evaluate_vars(model, avg, test)["accuracy"]
            res["aligned_average_bn"] = evaluate_vars(model, with_bn(avg), test)["accuracy"]
    if "double_width_pruned" in config.baselines:
        wide = dataclasses.replace(config.teacher, model_kwargs=big_model_kwargs(config.teacher.model_kwargs), epochs=2 * T)
        vw, sw = _teacher(wide, base + 4, train, test, progress)
        res["double_width_before_pruning"] = sw["test_accuracy"]
        _, sp = shrink(vw, dataclasses.replace(config.merge, seed=base + 4), train, test, progress=progress)
        res["double_width_pruned"] = sp["after_finetune"]["accuracy"]
        res["double_width_after_compression"] = sp["after_compression"]["accuracy"]
        res["double_width_gate_binariness"] = sp["gate_binariness"]
    res["wall_time_s"] = time.perf_counter() - t0
    return res


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


def _table(config: MergeExperiment, runs: list) -> tuple[str, dict, dict]:
    T, G, F = config.teacher.epochs, config.merge.gate_epochs, config.merge.finetune_epochs
    rows, summary = [], {}
    for key, label, epochs, flops in STAGES:
        if not all(key in r for r in runs):
            continue
        vals = [r[key] for r in runs]
        summary[key] = report.mean_std(vals)
        rows.append({"stage": label, "test accuracy (%)": report.fmt_mean_std(vals, 100.0),
                     "epochs": f"{epochs(T, G, F):g}", "cost (teacher-epoch FLOPs)": f"{flops(T, G, F):g}"})
    binar = {k: report.mean_std([r["gate_binariness"][k] for r in runs]) for k in runs[0]["gate_binariness"]}
    table = (f"`{config.teacher.model}` {dict(config.teacher.model_kwargs)} on `{config.teacher.dataset}`, "
             f"T={T:g}, G={G:g}, F={F:g} epochs, {len(runs)} seeds (mean ± sample std); device: "
             f"{jax.devices()[0].device_kind}, {sum(r['wall_time_s'] for r in runs):.0f} s in all.\n\n"
             + report.markdown_table(rows))
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
    runs = [run_seed(config, s, train, test, progress) for s in config.seeds]
    table, summary, binar = _table(config, runs)
    plots = _plots(out_dir, runs, config)
    results = {
        "experiment": NAME, "config": to_dict(config), "summary": summary, "gate_binariness": binar,
        "runs": runs, "device_kind": jax.devices()[0].device_kind, "plots": [os.path.basename(p) for p in plots],
    }
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": plots}


def main(argv=None):
    experiment_main(argv, PRESETS, NAME, __doc__, run)


if __name__ == "__main__":
    main()
