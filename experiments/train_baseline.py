"""Train one model on one dataset from a preset; write results.json, a table and curves.

    python experiments/train_baseline.py                      # tiny: small CNN on digits, CPU, ~1 min
    python experiments/train_baseline.py --preset paper       # ResNet-20 on CIFAR-10 (He et al. 2016)
    python experiments/train_baseline.py --set train.lr=0.05 --set seeds=(0,1,2)
    python experiments/train_baseline.py --list-config        # every key, its value and type

Each seed is a resumable unit (``units/seed<k>``): checkpoints every ``checkpoint_every``
steps, the finished summary kept on disk.
"""

from __future__ import annotations

import os
import sys

import ml_collections

from mergejax import papers, report
from mergejax.config import replace, to_dict
from mergejax.experiment import config_file, experiment_main, unit
from mergejax.papers import resnet as papers_resnet
from mergejax.run import seed_groups, train_and_evaluate, train_and_evaluate_many

NAME = "train_baseline"
ORDER = 0  # place in results/<preset>/REPORT.md
CONFIG = config_file(__file__)  # configs/train_baseline.py
PRESETS, get_config, plan = CONFIG.PRESETS, CONFIG.get_config, CONFIG.plan


def run_group(config: ml_collections.ConfigDict, group: list[int], out_dir: str, progress: bool) -> list[dict]:
    """The seeds of ``group`` as one resumable unit: ``seed<k>`` alone, ``seeds<a>_<b>`` vmapped together
    (each model equals its solo run to float rounding). Checkpoints in the unit's ``fit/``."""
    if len(group) == 1:
        cfg = replace(config.train, seed=group[0])
        return [{"seed": group[0], **unit(out_dir, f"seed{group[0]}", cfg, lambda wd: train_and_evaluate(
            cfg, os.path.join(wd, "fit"), progress=progress)[1])}]
    ucfg = {"train": {k: v for k, v in to_dict(config.train).items() if k != "seed"}, "seeds": group}
    out = unit(out_dir, "seeds" + "_".join(map(str, group)), ucfg, lambda wd: {"runs": train_and_evaluate_many(
        config.train, group, os.path.join(wd, "fit"), progress=progress)[1]})
    return out["runs"]


def run(config: ml_collections.ConfigDict, out_dir: str, progress: bool = True) -> dict:
    groups = seed_groups(config.train, config.seeds, config.models_per_program, pin=(os.path.join(out_dir, "groups.json"), "seeds"))
    runs = [r for group in groups for r in run_group(config, group, out_dir, progress)]
    rows = [{k: r[k] for k in ("seed", "test_accuracy", "test_loss", "steps", "wall_time_s")} for r in runs]
    acc = report.mean_std([r["test_accuracy"] for r in runs])
    table = (f"Model `{config.train.model}` on `{config.train.dataset}`; test accuracy {acc['mean']:.4f} ± {acc['std']:.4f} "
             f"over {acc['n']} seed(s).\n\n") + report.markdown_table(rows)
    curves = {}
    for r in runs:
        test = [h for h in r["history"] if h["split"] == "test"]
        train = [h for h in r["history"] if h["split"] == "train"]
        curves[f"train loss (seed {r['seed']})"] = ([h["step"] for h in train], [h["loss"] for h in train])
        curves[f"test loss (seed {r['seed']})"] = ([h["step"] for h in test], [h["loss"] for h in test])
    plot = report.plot_curves(os.path.join(out_dir, "curves.png"), curves, xlabel="step", ylabel="cross-entropy (nats)", logy=True,
                              title=f"{config.train.model} on {config.train.dataset}")
    comparison = papers_resnet.compare(to_dict(config.train), runs)  # He et al. 2016, Table 6 (CIFAR-10 ResNets)
    table += ("\n**Published numbers** (He et al. 2016, Table 6; ours: mean test error % over seeds):\n\n"
              + papers.markdown(comparison))
    results = {"experiment": NAME, "config": to_dict(config), "test_accuracy": acc, "runs": runs,
               "device_kind": runs[0]["device_kind"], "plots": [os.path.basename(plot)], "paper_comparison": comparison}
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": [plot]}


def main(argv=None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
