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

from mergejax import cost, report
from mergejax.config import replace, to_dict, train_config
from mergejax.experiment import experiment_main, unit
from mergejax.run import train_and_evaluate

NAME = "train_baseline"
ORDER = 0  # place in results/<preset>/REPORT.md
PRESETS = ("tiny", "digits", "smoke", "paper")


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seeds = (0,)
    if preset in ("tiny", "digits"):
        c.train = train_config(dataset="digits", model="cnn", batch_size=64, epochs=15, lr=0.1, weight_decay=5e-4,
                               log_every=11)
    elif preset == "smoke":  # seconds: checks the pipeline end to end (CI), not the method
        c.train = train_config(dataset="digits", model="cnn", model_kwargs={"width": 0.25}, batch_size=64, steps=20,
                               lr=0.1, log_every=10, checkpoint_every=5)
    elif preset == "paper":
        # He et al. 2016, Sec. 4.2: batch 128, SGD momentum 0.9, wd 1e-4, lr 0.1 divided by 10 at
        # 32k and 48k iterations, stop at 64k (= 50% and 75% of training); pad-crop-flip.
        c.train = train_config(dataset="cifar10", model="resnet20", batch_size=128, steps=64_000, lr=0.1, momentum=0.9,
                               weight_decay=1e-4, schedule="step", step_boundaries=(0.5, 0.75), augment=True,
                               log_every=200, eval_every=2000, checkpoint_every=2000)
    return c


def plan(config: ml_collections.ConfigDict) -> list[dict]:
    """One training run per seed (for ``--dry-run``)."""
    return [cost.plan_row(f"seed{seed}", config.train) for seed in config.seeds]


def train_unit(cfg: ml_collections.ConfigDict, progress: bool):
    """A unit body: train ``cfg`` in ``workdir/fit`` (resumable), return the summary."""
    def fn(workdir):
        _, summary = train_and_evaluate(cfg, os.path.join(workdir, "fit"), progress=progress)
        return summary
    return fn


def run(config: ml_collections.ConfigDict, out_dir: str, progress: bool = True) -> dict:
    runs = []
    for seed in config.seeds:
        cfg = replace(config.train, seed=seed)
        runs.append({"seed": seed, **unit(out_dir, f"seed{seed}", cfg, train_unit(cfg, progress))})
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
    results = {"experiment": NAME, "config": to_dict(config), "test_accuracy": acc, "runs": runs,
               "device_kind": runs[0]["device_kind"], "plots": [os.path.basename(plot)]}
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": [plot]}


def main(argv=None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
