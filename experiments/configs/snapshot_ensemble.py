"""Config file of ``experiments/snapshot_ensemble.py``: the Snapshot Ensembles comparison at equal budget;
``paper`` is the whole Table 1 grid and Table 3 (subsets with ``networks``, ``datasets``, ``columns``, ``table3_ms``)."""

from __future__ import annotations

import ml_collections

from mergejax import cost
from mergejax.config import train_config
from mergejax.ensembles.comparison import alpha0s, grid
from mergejax.ensembles.swa import training_runs
from mergejax.papers import snapshot as paper

PRESETS = ("tiny", "digits", "smoke", "paper")
COLUMNS = ("single", "nocycle", "single_cycle", "dropout", "snapshot_a0.1", "snapshot_a0.2")  # Table 1's methods
EXTRAS = ("true_ensemble", "swa", "fge", "long_teacher", "weight_average")


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    sgd = dict(momentum=0.9, nesterov=True, lr=0.1)  # train: the budget B, batch, optimizer (lr: the single model's); M = num_snapshots
    c = ml_collections.ConfigDict(dict(  # SWA: Izmailov et al. 2018 (CIFAR, lr_init 0.1); starts: fractions of B
        seeds=(0, 1, 2), num_snapshots=5, columns=tuple(c for c in COLUMNS if c != "dropout"), extras=EXTRAS[:3],
        single_cycle_alpha0=0.1, dropout=0.2, swa_lr=0.05, swa_start=0.5, fge_start=0.5, fge_alpha1=0.05, fge_alpha2=0.0005,
        eval_batch_size=500, networks=(), datasets=(), budgets={}, no_augment=("svhn_cropped",), table3_ms=(),
        network_kwargs={}, train_splits={}, holdout={},  # network -> model kwargs; dataset -> train split; -> examples withheld
        models_per_program=0))  # members of one schedule per vmapped program (true ensemble, single cycle); 0 = auto: 1 on CPU
    small = dict(dataset="digits", model="cnn", model_kwargs={"width": 0.25}, batch_size=64, weight_decay=5e-4, log_every=11, **sgd)
    if preset == "paper":
        # Huang et al. 2017, Sec. 4 (shared/reference/snapshot_ensembles.md): batch 64, SGD Nesterov 0.9, wd 1e-4; single model
        # 0.1, /10 at 50%, 75%. budgets[dataset][network] = (epochs B, cycles M): CIFAR ResNet-110/WRN-32 200 = 5 x 40, DenseNets
        # 300 = 6 x 50; SVHN 40 = 5 x 8, no augmentation (CIFAR: pad-crop-flip), on train + extra (73,257 + 531,131) less 6,000
        # withheld (seed 0, never used) as in the common practice the paper follows (stochastic depth, DenseNet papers);
        # Tiny ImageNet 150 = 6 x 25, batch 128 for ResNet/WRN and 64 for DenseNet-40 (the same CIFAR networks on 64x64
        # inputs; pad-4 crop-flip, our choice: the reference does not say); test = its official val split (10,000).
        # No DenseNet-100 on SVHN or Tiny ImageNet in the paper. Dropout column: p = 0.2 (the DenseNet paper's rate). Extras off.
        # ResNet-110 and WRN-32-4 use option-A (parameter-free) shortcuts: the authors' code (gaohuang/SnapshotEnsemble, on
        # fb.resnet.torch) defaults to shortcutType 'A' for CIFAR in opts.lua, as He et al. 2016 Sec. 4.2 do on CIFAR.
        cifar = {"resnet110": (200.0, 5), "wrn32_4": (200.0, 5), "densenet40": (300.0, 6), "densenet100": (300.0, 6)}
        svhn = {k: (40.0, 5) for k in ("resnet110", "wrn32_4", "densenet40")}
        tiny = {"resnet110": (150.0, 6, 128), "wrn32_4": (150.0, 6, 128), "densenet40": (150.0, 6, 64)}
        c.update(train=train_config(dataset="cifar10", model="resnet110", batch_size=64, epochs=200.0, weight_decay=1e-4,
                                    augment=True, log_every=200, **sgd), seeds=(0,), num_snapshots=0, columns=COLUMNS, extras=(),
                 networks=tuple(paper.NETWORKS), datasets=("cifar10", "cifar100", "svhn_cropped", "tiny_imagenet"),
                 table3_ms=(2, 4, 6, 8, 10), budgets={"cifar10": cifar, "cifar100": cifar, "svhn_cropped": svhn, "tiny_imagenet": tiny},
                 network_kwargs={"resnet110": {"shortcut": "A"}, "wrn32_4": {"shortcut": "A"}},
                 train_splits={"svhn_cropped": "train+extra"}, holdout={"svhn_cropped": 6000})
    elif preset == "smoke":  # seconds: the pipeline end to end (CI), not the method (2 epochs, M = 2, one seed)
        c.update(train=train_config(epochs=2.0, **small), seeds=(0,), num_snapshots=2)
    else:  # tiny: quarter-width SmallCNN (BatchNorm), M = 5 cycles of 3 epochs of 22 steps; a checkpoint every 5 epochs
        c.train = train_config(epochs=15.0, checkpoint_every=110, **small)
    return c


def plan(config) -> list[dict]:
    """One row per training run (for ``--dry-run``); a dropout run has the model's ``dropout`` set."""
    return [cost.plan_row(f"{cell.prefix}seed{seed}/{name}", cell.train, steps=steps, model_kwargs={
        **cell.train.model_kwargs.to_dict(), **({"dropout": config.dropout} if name == "dropout" else {})})
        for cell in grid(config) for seed in config.seeds
        for name, steps in training_runs(cell.methods, cost.train_steps(cell.train, config.holdout.get(cell.train.dataset, 0)),
                                         cell.M, alpha0s(cell.methods)).items()]
