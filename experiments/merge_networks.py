"""Merging two networks (Pašen & Boža 2022) against single-network baselines at equal budget.

    python experiments/merge_networks.py                  # tiny: width-0.5 CNN on digits, 3 seeds, CPU
    python experiments/merge_networks.py --preset paper   # ResNet-20 on CIFAR-100 (the authors' setting)
    python experiments/merge_networks.py --set seeds=(0,) --set baselines=()

Per seed: two teachers (T epochs), the long teacher (2T+G+F epochs; FLOP-matched 2T+4G+F), their
ensemble (= big student at step 0), the big student after G epochs of gate learning, the student
after compression and after F epochs of fine-tuning; baselines: naive and permutation-aligned weight
averages (BN statistics kept or recomputed) and a double-width network trained 2T epochs, then gated,
compressed and fine-tuned alike. Cost in epochs and teacher-epoch FLOPs (double width ~ 4).
Resumable units ``units/seed<k>/<stage>``; later units load the networks earlier ones saved. With
``models_per_program`` >= 2 (0 = auto: 1 on CPU) the two teachers train as one vmapped program (unit ``teachers``).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import ml_collections

from mergejax import papers, report
from mergejax.averaging.parallel import resolve_devices
from mergejax.averaging.rebasin import align
from mergejax.averaging.weights import average
from mergejax.cli.merge import stage_args
from mergejax.config import replace, to_dict
from mergejax.core import checkpoint, data as data_lib
from mergejax.core.rundir import fingerprint_path
from mergejax.core.train import model_apply_fn
from mergejax.core.units import unit_spec, variables_of
from mergejax.ensembles.swa import recompute_batch_stats
from mergejax.experiment import config_file, experiment_main, unit
from mergejax.merging import report as merge_report
from mergejax.merging.concat import concat
from mergejax.merging.pipeline import compress_stage, double_width, evaluate_vars, gate_stage, seed_of
from mergejax.run import model_of, seed_groups, setup, train_and_evaluate, train_and_evaluate_many

NAME, ORDER = "merge_networks", 40
CONFIG = config_file(__file__)  # configs/merge_networks.py
PRESETS, get_config, plan = CONFIG.PRESETS, CONFIG.get_config, CONFIG.plan
AB = ("teacher_a", "teacher_b")


def run_seed(config, seed: int, train, test, out_dir: str, progress: bool) -> dict:
    T, G, F = config.teacher.epochs, config.merge.gate_epochs, config.merge.finetune_epochs
    names = ("teacher_a", "teacher_b", "long_teacher", "long_teacher_flops", "gates", "merged", "double_width",
             "double_width_gates", "double_width_pruned")
    keys = dict(zip(names, jax.random.split(jax.random.key(seed), len(names))))
    ab_seeds = [seed_of(keys[n]) for n in AB]  # both teachers in one vmapped program when models_per_program allows
    joint = len(seed_groups(config.teacher, ab_seeds, config.models_per_program, pin=(os.path.join(out_dir, "groups.json"), f"seed{seed}"))) == 1
    path = lambda name, item="variables": os.path.join(out_dir, "units", f"seed{seed}",  # noqa: E731
                                                       *(("teachers",) if joint and name in AB else ()), name, item)
    model = model_of(config.teacher, train.num_classes)
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

    def teachers(wd, cfg):  # train_and_evaluate_many of both teachers; each saved to wd/<name>/variables
        states, summaries = train_and_evaluate_many(cfg, ab_seeds, os.path.join(wd, "fit"), progress=progress)
        for name, state in zip(AB, states):
            checkpoint.save(os.path.join(wd, name, "variables"), variables_of(state.params, state.batch_stats), overwrite=True)
        return dict(zip(AB, summaries))

    def averaged(wd, aligned):  # (aligned) weight average, with its own and with recomputed BN statistics
        a, b = (checkpoint.load(path(n)) for n in AB)
        avg = average([a, align(unit_spec(model, a), a, b) if aligned else b])
        bn = {**avg, "batch_stats": recompute_batch_stats(model_apply_fn(model), avg["params"], avg["batch_stats"], train)}
        return {"plain": evaluate_vars(model, avg, test), "bn": evaluate_vars(model, bn, test)}

    def on_devices(args):  # each batch of the gate and fine-tune stages split over teacher.devices
        return resolve_devices(config.teacher.devices, args["batch_size"])

    def gated(wd, sources, key):  # gate learning on two saved networks' concatenation, or one double-width network
        nets = [checkpoint.load(path(n)) for n in sources]
        big_vars = concat(*nets, unit_spec(model, nets[0])) if len(nets) == 2 else nets[0]
        vars_, las, summary = gate_stage(big, big_vars, train, test, key=key, workdir=wd, progress=progress, devices=on_devices(gate_args), **gate_args)
        checkpoint.save(os.path.join(wd, "gated"), {"vars": vars_, "log_alphas": las}, overwrite=True)
        return summary

    def compressed(wd, source, key, from_concat):  # compress the saved gated network and fine-tune it
        g = checkpoint.load(path(source, "gated"))
        halves = {k: n // 2 for k, n in unit_spec(big, g["vars"]).groups.items()} if from_concat else None
        return compress_stage(big, model, g["vars"], g["log_alphas"], train, test, key=key, workdir=wd, progress=progress,
                              teacher_units=halves, devices=on_devices(finetune_args), **finetune_args)[1]

    epochs = {"teacher_a": T, "teacher_b": T, "long_teacher": 2 * T + G + F, "long_teacher_flops": 2 * T + 4 * G + F}
    width2 = {**dict(config.teacher.model_kwargs), "width": float(config.teacher.model_kwargs.get("width", 1.0)) * 2}
    if joint:
        cfg = replace(config.teacher, epochs=float(T))
        do("teachers", lambda wd: teachers(wd, cfg), {"train": to_dict(cfg), "seeds": ab_seeds})
        t = u.pop("teachers")  # one program's time, counted once
        u.update({n: {**t[n], "unit_time_s": t["unit_time_s"] if n == AB[0] else 0.0} for n in AB})
    for name in (n for n in epochs if (n != "long_teacher_flops" or n in config.baselines) and not (joint and n in AB)):
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
    return {"seed": seed, "seeds": {n: seed_of(k) for n, k in keys.items()}, **merge_report.seed_row(u)}


def run(config: ml_collections.ConfigDict, out_dir: str, progress: bool = True) -> dict:
    """One setting (tiny, smoke) as before; with ``rows`` each row in ``out_dir/rows/<row>``
    (its own units), its table and plots, and the published numbers beside the rows that have them."""
    parts, plots, tables = {}, [], []
    for row, c in CONFIG.settings(config):
        row_dir = out_dir if row is None else os.path.join(out_dir, "rows", row)
        train, test = data_lib.load_train(c.teacher.dataset, c.teacher.train_split), data_lib.load(c.teacher.dataset, "test")
        runs = [run_seed(c, s, train, test, row_dir, progress) for s in c.seeds]
        table, summary, binar = merge_report.table(c, runs, runs[0]["device_kind"])
        os.makedirs(row_dir, exist_ok=True)
        plots += merge_report.plots(row_dir, runs, c)
        tables.append(table if row is None else f"### {row}\n\n{table}")
        parts[row] = {"summary": summary, "gate_binariness": binar, "runs": runs, "device_kind": runs[0]["device_kind"]}
    comparison = merge_report.paper_comparison(parts, config)
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


def main(argv=None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
