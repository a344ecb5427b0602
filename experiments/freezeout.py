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
from mergejax.averaging.parallel import resolve_devices
from mergejax.config import replace, to_dict
from mergejax.core import data as data_lib
from mergejax.core.optim import make_optimizer
from mergejax.experiment import config_file, experiment_main, unit
from mergejax.freezeout import sweep
from mergejax.papers import freezeout as papers_freezeout
from mergejax.run import compilation_cache_dir, model_of, num_steps

NAME, ORDER = "freezeout", 30
CONFIG = config_file(__file__)  # configs/freezeout.py
PRESETS, get_config, plan = CONFIG.PRESETS, CONFIG.get_config, CONFIG.plan


def run(config: ml_collections.ConfigDict, out_dir: str, progress: bool = True) -> dict:
    tc0 = config.train
    train, test = data_lib.load_train(tc0.dataset, tc0.train_split), data_lib.load(tc0.dataset, "test")
    evaluated_on = "test split"
    if config.validation:
        train, test = data_lib.holdout(train, config.validation, config.validation_seed)
        evaluated_on = (f"{config.validation} examples held out of the training split (seed {config.validation_seed}; "
                        f"trained on the other {len(train)}), as the authors report validation error")
    sections, all_runs, all_rows, plots, costs, totals, cache = [], [], [], [], {}, {}, compilation_cache_dir()
    for net, tc in CONFIG.networks(config):
        runs, total = _sweep(config, net, tc, train, test, out_dir, progress)
        rows = [sweep.row(lab, [r for r in runs if r["label"] == lab]) for lab in dict.fromkeys(r["label"] for r in runs)]
        if net:
            rows = [{"network": net, **r} for r in rows]
        sections.append(sweep.table(config, tc, runs, rows, total, evaluated_on, cache, heading=net))
        name = "speed_vs_accuracy.png" if net is None else f"speed_vs_accuracy_{net}.png"
        plots.append(sweep.plot(os.path.join(out_dir, name), runs, f"{tc.model} on {tc.dataset}"))
        all_runs += runs
        all_rows += rows
        costs.update({(f"{net}/" if net else "") + k: c for r in runs for k, c in r["stage_costs"].items()})
        totals[net or tc.model] = total
    comparison = papers_freezeout.compare(all_runs, tc0.dataset, {net: to_dict(tc.model_kwargs) for net, tc in CONFIG.networks(config)})
    claims = "".join(f"- {c}\n" for c in papers_freezeout.CLAIMS)
    table = "\n".join(sections) + ("\n**Published numbers** (FreezeOut; flop_estimate: ours = predicted saving from XLA FLOPs "
                                   "per compiled stage; abstract: ours = the largest measured wall-clock saving among "
                                   "points whose accuracy loss against the baseline is within the paper's, and that "
                                   "loss):\n\n" + papers.markdown(comparison) + "\nClaims without a number:\n" + claims)
    resumed = [r["unit"] for r in all_runs if r["resumed"]]
    results = {"experiment": NAME, "config": to_dict(config), "device_kind": all_runs[0]["device_kind"],
               "compilation_cache": cache, "evaluated_on": evaluated_on, "rows": all_rows, "runs": all_runs,
               "stage_costs": costs, "total_steps": totals[next(iter(totals))] if len(totals) == 1 else totals,
               "units_timed_after_resume": resumed, "paper_comparison": comparison,
               "plots": [os.path.basename(p) for p in plots]}
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": plots}


def _sweep(config, net, tc, train, test, out_dir, progress) -> tuple[list[dict], int]:
    """Every timed training of one network: the sweep points between baseline timings."""
    model = model_of(tc, train.num_classes)
    total, _ = num_steps(tc, len(train))
    # unit rate: FreezeOut sets each layer's
    base = make_optimizer(tc.optimizer, 1.0, momentum=tc.momentum, nesterov=tc.nesterov, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)
    loop = dict(total_steps=total, batch_size=tc.batch_size, lr=tc.lr, max_stages=config.max_stages,
                augment_fn=data_lib.augment_cifar if tc.augment else None, remainder=tc.remainder, log_every=tc.log_every,
                checkpoint_every=tc.checkpoint_every, eval_batch_size=tc.eval_batch_size, repeats=config.repeats,
                progress=progress, cache={},  # cache: compiled stages shared by the sweep
                devices=resolve_devices(tc.devices, tc.batch_size))  # each batch split over them, BN synchronised
    runs = []
    for seed in config.seeds:
        for j, point in enumerate(CONFIG.sweep_points(config)):
            t0, spacing, scaled = point
            name = (f"{net}/" if net else "") + f"seed{seed}/{j:02d}-" + sweep.point_slug(point)
            ucfg = {"train": to_dict(replace(tc, seed=seed)), "t0": t0, "spacing": spacing, "scaled": scaled,
                    "max_stages": config.max_stages, "repeats": config.repeats}
            if config.validation:
                ucfg["validation"] = [config.validation, config.validation_seed]

            def fn(workdir):
                if progress:
                    print(f"-- {name}", flush=True)
                return {"label": sweep.point_label(point), **fo.train_and_evaluate(
                    model, train, test, base, t0=t0, spacing=spacing, scaled=scaled, seed=seed,
                    workdir=os.path.join(workdir, "fit"), manifest=ucfg, **loop)}

            runs.append({**unit(out_dir, name, ucfg, fn), "unit": name, **({"network": net} if net else {})})
    runs = sweep.compare_with_baselines([{**r, "order": i} for i, r in enumerate(runs)], lambda r: r["label"] == "baseline")
    return runs, total


def main(argv=None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
