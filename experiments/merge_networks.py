"""Merging two networks (Pašen & Boža 2022) against single-network baselines at equal budget.

    python experiments/merge_networks.py                  # tiny: width-0.5 CNN on digits, 3 seeds, CPU
    python experiments/merge_networks.py --preset paper   # ResNet-20 on CIFAR-100 (the authors' setting)
    python experiments/merge_networks.py --set seeds=(0,) --set baselines=()

Per seed: two teachers (T epochs), the long teacher (2T+G+F epochs; FLOP-matched 2T+4G+F), their
ensemble (= big student at step 0), the big student after G epochs of gate learning, the student
after compression and after F epochs of fine-tuning; baselines: naive and permutation-aligned weight
averages (BN statistics kept or recomputed) and a double-width network trained 2T epochs, then gated,
compressed and fine-tuned alike. Cost in epochs and teacher-epoch FLOPs (double width ~ 4).
Resumable units ``units/seed<k>/<stage>``; later units load the networks earlier ones saved.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import ml_collections

from mergejax import papers, report
from mergejax.papers import merging as papers_merging
from mergejax.averaging.rebasin import align
from mergejax.averaging.weights import average
from mergejax.cli.merge import get_config as merge_config, stage_args
from mergejax.config import replace, to_dict, train_config
from mergejax.core import checkpoint, data as data_lib
from mergejax.core.models import make_model
from mergejax.core.rundir import fingerprint_path
from mergejax.core.train import model_apply_fn
from mergejax.core.units import unit_spec, variables_of
from mergejax.ensembles.swa import recompute_batch_stats
from mergejax.experiment import experiment_main, unit
from mergejax.merging.concat import concat
from mergejax.merging.pipeline import compress_stage, double_width, evaluate_vars, gate_stage, seed_of, stage_steps
from mergejax.run import setup, train_and_evaluate

NAME, ORDER = "merge_networks", 40
PRESETS = ("tiny", "digits", "paper", "smoke")
AB = ("teacher_a", "teacher_b")
ROWS = ("resnet20_c100", "vgg11_c10")  # the paper preset's settings, each a config group of its own


def _row_config(row: str) -> ml_collections.ConfigDict:
    """One row of the ``paper`` preset: ``teacher`` (train_config) and ``merge`` (merge settings)."""
    r = ml_collections.ConfigDict()
    if row == "resnet20_c100":
        # fmfi-compbio/neural-network-merging, cifar100/: ResNet-20, SGD lr 0.1 momentum 0.9 wd 1e-4, batch 128,
        # teachers 200 epochs (x0.1 at 100, 150); gate stage and fine-tuning: mergejax.cli.merge.get_config('paper').
        r.teacher = train_config(dataset="cifar100", model="resnet20", batch_size=128, epochs=200.0, lr=0.1,
                                 weight_decay=1e-4, schedule="step", step_boundaries=(0.5, 0.75), augment=True,
                                 log_every=200, eval_every=0)
        r.merge = merge_config("paper")
    elif row == "vgg11_c10":
        # The authors' notebook cifar10_vgg11/Make student.ipynb loads two pretrained VGG-11 teachers (no BN, no
        # biases) whose training recipe is not in the repository; ours (our choice): SGD lr 0.05 momentum 0.9
        # wd 5e-4 (the notebook's gate-stage and fine-tune optimizer), batch 128, flip + pad-crop, 200 epochs,
        # x0.1 at 100 and 150. Gate stage and fine-tuning: mergejax.cli.merge.get_config('paper_vgg11')
        # (lambda 0.01, per-epoch step 0.01 before every epoch, 100 importance epochs, gate after each conv's ReLU).
        r.teacher = train_config(dataset="cifar10", model="vgg11_nobn", batch_size=128, epochs=200.0, lr=0.05,
                                 weight_decay=5e-4, schedule="step", step_boundaries=(0.5, 0.75), augment=True,
                                 log_every=200, eval_every=0)
        r.merge = merge_config("paper_vgg11")
    else:
        raise ValueError(f"unknown merge row {row!r}; available: {', '.join(ROWS)}")
    return r


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    """``teacher`` + ``merge`` (one setting), or with ``rows`` (the ``paper`` preset) one config
    group per row: ``--set rows=('vgg11_c10',)`` runs one of them."""
    c = ml_collections.ConfigDict()
    c.seeds, c.baselines = (0, 1, 2), ("long_teacher_flops", "naive_average", "aligned_average", "double_width_pruned")
    c.rows = ()  # empty: the top-level teacher/merge
    if preset == "paper":
        c.rows = ROWS
        for row in ROWS:
            c[row] = _row_config(row)
    elif preset == "smoke":  # seconds: the pipeline end to end (CI), not the method
        c.teacher = train_config(dataset="digits", model="cnn", model_kwargs={"width": 0.25}, batch_size=64, epochs=0.5,
                                 lr=0.1, schedule="cosine", log_every=11)
        c.merge = replace(merge_config("tiny"), model_kwargs={"width": 0.25}, gate_epochs=0.5, finetune_epochs=0.5,
                          log_every=11)
        c.seeds = (0,)
    else:  # tiny / digits: width-0.5 SmallCNN on digits; see merge_config for lambda and the gate lr
        c.teacher = train_config(dataset="digits", model="cnn", model_kwargs={"width": 0.5}, batch_size=64, epochs=6.0,
                                 lr=0.1, weight_decay=5e-4, schedule="cosine", log_every=22, checkpoint_every=220)
        c.merge = merge_config("tiny")
    return c


def settings(config: ml_collections.ConfigDict) -> list[tuple[str | None, ml_collections.ConfigDict]]:
    """``[(row name or None, config with that row's teacher/merge at the top level)]``."""
    if not config.rows:
        return [(None, config)]
    unknown = [r for r in config.rows if r not in config]
    if unknown:
        raise ValueError(f"rows {unknown} have no config group; available: {', '.join(r for r in ROWS if r in config)}")
    out = []
    for row in config.rows:
        c = ml_collections.ConfigDict({"seeds": config.seeds, "baselines": config.baselines, "rows": ()})
        c.teacher, c.merge = config[row].teacher, config[row].merge
        out.append((row, c))
    return out


def plan(config: ml_collections.ConfigDict) -> list[dict]:
    """One row per training run (the --dry-run contract): per seed the two teachers, the long
    teacher(s), the gate stage at double width, the fine-tuning, and the double-width baseline's
    three runs. Gate stages count as runs of the double-width network (``width_factor`` 2)."""
    from mergejax.cost import dataset_shape, plan_row

    rows = []
    for row, c in settings(config):
        T, G, F = c.teacher.epochs, c.merge.gate_epochs, c.merge.finetune_epochs
        n = dataset_shape(c.teacher.dataset).num_train
        g_steps, f_steps = stage_steps(G, n, c.merge.batch_size)[0], stage_steps(F, n, c.merge.batch_size)[0]
        epochs = {"teacher_a": T, "teacher_b": T, "long_teacher": 2 * T + G + F}
        if "long_teacher_flops" in c.baselines:
            epochs["long_teacher_flops"] = 2 * T + 4 * G + F
        for seed in c.seeds:
            pre = f"{row}/seed{seed}" if row else f"seed{seed}"
            for name, e in epochs.items():
                rows.append(plan_row(f"{pre}/{name}", replace(c.teacher, epochs=float(e))))
            merge_runs = [("gates", g_steps, 2.0), ("merged", f_steps, 1.0)]
            if "double_width_pruned" in c.baselines:
                rows.append(plan_row(f"{pre}/double_width", replace(c.teacher, epochs=float(2 * T)), width_factor=2.0))
                merge_runs += [("double_width_gates", g_steps, 2.0), ("double_width_pruned", f_steps, 1.0)]
            for name, steps, wf in merge_runs:
                rows.append(plan_row(f"{pre}/{name}", c.teacher, steps=steps, batch_size=int(c.merge.batch_size),
                                     width_factor=wf))
    return rows


STAGES = [  # (key, unit result it reads: "unit.summary" or a trained network's "unit", label, epochs and
    # teacher-epoch FLOP units as coefficients of (T, G, F))
    ("teacher", "", "teacher (one network)", (1, 0, 0), (1, 0, 0)),
    ("long_teacher", "long_teacher", "long teacher (2T+G+F epochs)", (2, 1, 1), (2, 1, 1)),
    ("long_teacher_flops", "long_teacher_flops", "long teacher, FLOP-matched (2T+4G+F epochs)", (2, 4, 1), (2, 4, 1)),
    ("ensemble", "gates.big_start", "ensemble of 2 teachers = big student step 0", (2, 0, 0), (2, 0, 0)),
    ("naive_average", "naive_average.plain", "naive weight average of the teachers", (2, 0, 0), (2, 0, 0)),
    ("naive_average_bn", "naive_average.bn", "naive weight average, BN stats recomputed", (2, 0, 0), (2, 0, 0)),
    ("aligned_average", "aligned_average.plain", "permutation-aligned (weight matching) average", (2, 0, 0), (2, 0, 0)),
    ("aligned_average_bn", "aligned_average.bn", "aligned average, BN stats recomputed", (2, 0, 0), (2, 0, 0)),
    ("big_after_gates", "gates.big_student_after_gates", "big student after gate learning", (2, 1, 0), (2, 4, 0)),
    ("after_compression", "merged.after_compression", "student right after compression", (2, 1, 0), (2, 4, 0)),
    ("merged", "merged.after_finetune", "merged student after fine-tuning", (2, 1, 1), (2, 4, 1)),
    ("double_width_pruned", "double_width_pruned.after_finetune",
     "double width from scratch (2T), gated, pruned, fine-tuned", (2, 1, 1), (8, 4, 1)),
]
MORE = {"teacher_a": "teacher_a", "teacher_b": "teacher_b", "big_step0_gated": "gates.big_student_step0",
        "double_width_before_pruning": "double_width", "double_width_after_compression": "double_width_pruned.after_compression"}


def run_seed(config, seed: int, train, test, out_dir: str, progress: bool) -> dict:
    T, G, F = config.teacher.epochs, config.merge.gate_epochs, config.merge.finetune_epochs
    names = ("teacher_a", "teacher_b", "long_teacher", "long_teacher_flops", "gates", "merged", "double_width",
             "double_width_gates", "double_width_pruned")
    keys = dict(zip(names, jax.random.split(jax.random.key(seed), len(names))))
    path = lambda name, item="variables": os.path.join(out_dir, "units", f"seed{seed}", name, item)  # noqa: E731
    model = make_model(config.teacher.model, train.num_classes, **dict(config.teacher.model_kwargs))
    big, (gate_args, finetune_args), u = double_width(model), stage_args(config.merge, len(train)), {}

    def do(name, fn, cfg=None, after=()):  # one timed unit; ``after``: the units whose saved networks it reads
        inputs = {n: fingerprint_path(path(n, "gated" if n.endswith("gates") else "variables"))["hash"] for n in after}
        t0 = time.perf_counter()
        u[name] = unit(out_dir, f"seed{seed}/{name}", cfg or {"experiment": to_dict(config), "seed": seed},
                       lambda wd: {**fn(wd), "unit_time_s": time.perf_counter() - t0}, inputs=inputs)

    def teacher(wd, cfg):  # train cfg in wd/fit, save {'params', 'batch_stats'} to wd/variables
        state, summary = train_and_evaluate(cfg, os.path.join(wd, "fit"), progress=progress,
                                            setup_=setup(cfg, train=train, test=test))
        checkpoint.save(os.path.join(wd, "variables"), variables_of(state.params, state.batch_stats), overwrite=True)
        return summary

    def averaged(wd, aligned):  # (aligned) weight average, with its own and with recomputed BN statistics
        a, b = (checkpoint.load(path(n)) for n in AB)
        avg = average([a, align(unit_spec(model, a), a, b) if aligned else b])
        bn = {**avg, "batch_stats": recompute_batch_stats(model_apply_fn(model), avg["params"], avg["batch_stats"], train)}
        return {"plain": evaluate_vars(model, avg, test), "bn": evaluate_vars(model, bn, test)}

    def gated(wd, sources, key):  # gate learning on two saved networks' concatenation, or one double-width network
        nets = [checkpoint.load(path(n)) for n in sources]
        big_vars = concat(*nets, unit_spec(model, nets[0])) if len(nets) == 2 else nets[0]
        vars_, las, summary = gate_stage(big, big_vars, train, test, key=key, workdir=wd, progress=progress, **gate_args)
        checkpoint.save(os.path.join(wd, "gated"), {"vars": vars_, "log_alphas": las}, overwrite=True)
        return summary

    def compressed(wd, source, key, from_concat):  # compress the saved gated network and fine-tune it
        g = checkpoint.load(path(source, "gated"))
        halves = {k: n // 2 for k, n in unit_spec(big, g["vars"]).groups.items()} if from_concat else None
        return compress_stage(big, model, g["vars"], g["log_alphas"], train, test, key=key, workdir=wd, progress=progress,
                              teacher_units=halves, **finetune_args)[1]

    epochs = {"teacher_a": T, "teacher_b": T, "long_teacher": 2 * T + G + F, "long_teacher_flops": 2 * T + 4 * G + F}
    width2 = {**dict(config.teacher.model_kwargs), "width": float(config.teacher.model_kwargs.get("width", 1.0)) * 2}
    for name in (n for n in epochs if n != "long_teacher_flops" or n in config.baselines):
        cfg = replace(config.teacher, seed=seed_of(keys[name]), epochs=float(epochs[name]))
        do(name, lambda wd, cfg=cfg: teacher(wd, cfg), cfg)
    for name in (n for n in ("naive_average", "aligned_average") if n in config.baselines):
        do(name, lambda wd, aligned=name == "aligned_average": averaged(wd, aligned), after=AB)
    do("gates", lambda wd: gated(wd, AB, keys["gates"]), after=AB)
    do("merged", lambda wd: compressed(wd, "gates", keys["merged"], True), after=("gates",))
    if "double_width_pruned" in config.baselines:
        cfg = replace(config.teacher, seed=seed_of(keys["double_width"]), epochs=float(2 * T), model_kwargs=width2)
        do("double_width", lambda wd: teacher(wd, cfg), cfg)
        do("double_width_gates", lambda wd: gated(wd, ["double_width"], keys["double_width_gates"]), after=("double_width",))
        do("double_width_pruned", lambda wd: compressed(wd, "double_width_gates", keys["double_width_pruned"], False),
           after=("double_width_gates",))
    return {"seed": seed, "seeds": {n: seed_of(k) for n, k in keys.items()}, **_flat(u)}


def _flat(u: dict) -> dict:
    """The per-seed row of results.json from the unit results."""
    src = {k: v.partition(".")[::2] for k, v in {**{k: v for k, v, *_ in STAGES if v}, **MORE}.items()}
    r = {k: u[n][f]["accuracy"] if f else u[n]["test_accuracy"] for k, (n, f) in src.items() if n in u}
    g, m = u["gates"], u["merged"]
    tested = [x["accuracy"] for x in m.get("finetune_log", []) if x.get("split") == "test" and "accuracy" in x]
    r["merged_best"] = max(tested) if tested else None  # best epoch of fine-tuning (the notebook's "best")
    r.update(teacher=(r["teacher_a"] + r["teacher_b"]) / 2, gate_binariness=g["gate_binariness"],
             gate_binariness_per_group=g["gate_binariness_per_group"], kept_from_teacher_a=m.get("kept_from_teacher_a"),
             gate_history=g["gate_history"], merge_time_s={**g["timing_s"], **m["timing_s"]},
             device_kind=u["teacher_a"]["device_kind"], wall_time_s=sum(x["unit_time_s"] for x in u.values()))
    if "double_width_gates" in u:
        r["double_width_gate_binariness"] = u["double_width_gates"]["gate_binariness"]
    return r


def _plots(out_dir, runs, config):
    h = runs[0]["gate_history"]
    gate_plot = report.plot_curves(os.path.join(out_dir, "gate_open_probability.png"),
                                   {g: (h["step"], v) for g, v in h["prob_open"].items()}, xlabel="gate-learning step",
                                   ylabel="mean P[g > 0] per group", title=f"gate open probability (seed {runs[0]['seed']})")
    keys = [k for k, *_ in STAGES if all(k in r for r in runs)]
    title = f"{config.teacher.model} on {config.teacher.dataset}: accuracy per stage ({len(runs)} seeds)"
    return [gate_plot, report.plot_points(os.path.join(out_dir, "accuracy_per_stage.png"), runs, keys,
                                          ylabel="test accuracy", title=title, off_scale=0.2)]


def _table(config, runs: list, device: str) -> tuple[str, dict, dict]:
    TGF = (config.teacher.epochs, config.merge.gate_epochs, config.merge.finetune_epochs)
    cost = lambda coef: f"{sum(c * x for c, x in zip(coef, TGF)):g}"  # noqa: E731
    rows, summary, pct = [], {}, lambda key: report.fmt_mean_std([r[key] for r in runs], 100.0)  # noqa: E731
    for key, _, label, epochs, flops in STAGES:
        if all(key in r for r in runs):
            summary[key] = report.mean_std([r[key] for r in runs])
            rows.append({"stage": label, "test accuracy (%)": pct(key), "epochs": cost(epochs),
                         "cost (teacher-epoch FLOPs)": cost(flops)})
    b = {k: report.mean_std([r["gate_binariness"][k] for r in runs]) for k in runs[0]["gate_binariness"]}
    table = (f"`{config.teacher.model}` {dict(config.teacher.model_kwargs)} on `{config.teacher.dataset}`, "
             f"T={TGF[0]:g}, G={TGF[1]:g}, F={TGF[2]:g} epochs, {len(runs)} seeds (mean ± sample std); device: "
             f"{device}, {sum(r['wall_time_s'] for r in runs):.0f} s in all.\n\n" + report.markdown_table(rows))
    table += ("\nGates before compression (deterministic gate, pooled over groups, mean over seeds): "
              f"{100 * b['frac_zero']['mean']:.1f}% exactly 0, {100 * b['frac_one']['mean']:.1f}% exactly 1, "
              f"{100 * b['frac_between']['mean']:.1f}% in between; mean distance to {{0,1}} "
              f"{b['mean_dist_to_binary']['mean']:.4f}; mean P[g>0] {b['mean_prob_open']['mean']:.3f}.\n")
    if all("double_width_before_pruning" in r for r in runs):
        table += (f"Double-width baseline: {pct('double_width_before_pruning')}% before pruning, "
                  f"{pct('double_width_after_compression')}% right after compression.\n")
    return table, summary, b


def run(config: ml_collections.ConfigDict, out_dir: str, progress: bool = True) -> dict:
    """One setting (tiny, smoke) as before; with ``rows`` each row in ``out_dir/rows/<row>``
    (its own units), its table and plots, and the published numbers beside the rows that have them."""
    parts, plots, tables = {}, [], []
    for row, c in settings(config):
        row_dir = out_dir if row is None else os.path.join(out_dir, "rows", row)
        train, test = data_lib.load(c.teacher.dataset, "train"), data_lib.load(c.teacher.dataset, "test")
        runs = [run_seed(c, s, train, test, row_dir, progress) for s in c.seeds]
        table, summary, binar = _table(c, runs, runs[0]["device_kind"])
        os.makedirs(row_dir, exist_ok=True)
        plots += _plots(row_dir, runs, c)
        tables.append(table if row is None else f"### {row}\n\n{table}")
        parts[row] = {"summary": summary, "gate_binariness": binar, "runs": runs, "device_kind": runs[0]["device_kind"]}
    comparison = paper_comparison(parts)
    table = "\n".join(tables) + "\n**Published numbers** (merging paper; " + (
        "ours: mean over seeds, test accuracy in %):\n\n" + papers.markdown(comparison))
    results = {"experiment": NAME, "config": to_dict(config), "paper_comparison": comparison,
               "plots": [os.path.relpath(p, out_dir) for p in plots]}
    if list(parts) == [None]:
        results.update(parts[None])
    else:
        results.update(device_kind=next(iter(parts.values()))["device_kind"], by_row=parts)
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": plots}


# our stage (a key of a run row) for each published cell of the VGG-11 CIFAR-10 notebook
VGG11_CELLS = {"C10/big student, gate stage start": "big_step0_gated", "C10/big student, gate stage end": "big_after_gates",
               "C10/after compression": "after_compression", "C10/after fine-tuning": "merged",
               "C10/after fine-tuning (best epoch)": "merged_best", "C10/OT fusion": "aligned_average",
               "C10/OT fusion (second value)": "aligned_average"}


def paper_comparison(parts: dict) -> dict:
    """:func:`mergejax.papers.side_by_side` of the merging paper's cells with our rows (mean over
    seeds, %). Only the VGG-11 CIFAR-10 row has published numbers; OT fusion (merging with no
    training) is set beside our permutation-aligned weight average."""
    ours = {}
    runs = (parts.get("vgg11_c10") or {}).get("runs")
    if runs:
        for column, key in VGG11_CELLS.items():
            if all(r.get(key) is not None for r in runs):
                ours[("cifar10_vgg11", papers_merging.VGG11, column)] = 100 * sum(r[key] for r in runs) / len(runs)
    return papers.side_by_side(papers.cells("merging"), ours)


def main(argv=None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
