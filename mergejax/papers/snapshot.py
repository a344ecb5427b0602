"""Huang, Li, Pleiss, Liu, Hopcroft, Weinberger, "Snapshot Ensembles: Train 1, get M for free", ICLR 2017
(arXiv 1704.00109): Tables 1-3 as :class:`~mergejax.papers.Cell` data (test error, %), as transcribed in
``shared/reference/snapshot_ensembles.md``.

:data:`NETWORKS`, :data:`DATASETS` and :data:`COLUMNS` map our model, dataset and method names to the
paper's row and column labels; :func:`table1_key` and :func:`table3_key` build a cell key from ours.
:func:`setting` is the paper's training setting of a cell (budget, M, batch, ...), against which a
run's own is checked (:func:`mergejax.papers.deviations`).
"""

from __future__ import annotations

from mergejax.papers import Cell

PAPER = "Huang et al. 2017, Snapshot Ensembles (ICLR)"
NETWORKS = {"resnet110": "ResNet-110", "wrn32_4": "Wide-ResNet-32", "densenet40": "DenseNet-40", "densenet100": "DenseNet-100"}
DATASETS = {"cifar10": "C10", "cifar100": "C100", "svhn_cropped": "SVHN", "tiny_imagenet": "TinyImageNet"}
#: our summary key -> the paper's Table 1 column
COLUMNS = {"single": "Single", "nocycle": "NoCycle", "single_cycle": "SingleCycle", "dropout": "Dropout",
           "snapshot_0.1": "Snapshot a0=0.1", "snapshot_0.2": "Snapshot a0=0.2"}

_T1_DATASETS = ("C10", "C100", "SVHN", "TinyImageNet")
# Table 1, one line per (row, column): errors on C10 / C100 / SVHN / Tiny ImageNet (DenseNet-100: C10 / C100 only).
_TABLE1 = {
    "ResNet-110": {"Single": (5.52, 28.02, 1.96, 46.50), "NoCycle": (5.49, 26.97, 1.78, 43.69),
                   "SingleCycle": (7.35, 26.30, 1.81, 45.50), "Snapshot a0=0.1": (5.73, 25.55, 1.63, 40.54),
                   "Snapshot a0=0.2": (5.32, 24.19, 1.66, 39.40)},
    "Wide-ResNet-32": {"Single": (5.43, 23.55, 1.90, 39.63), "Dropout": (4.68, 22.82, 1.81, 36.58),
                       "NoCycle": (5.18, 22.81, 1.81, 38.64), "SingleCycle": (5.86, 21.97, 1.68, 36.88),
                       "Snapshot a0=0.1": (4.41, 21.26, 1.64, 35.45), "Snapshot a0=0.2": (4.73, 21.56, 1.51, 32.90)},
    "DenseNet-40": {"Single": (5.24, 24.42, 1.77, 39.09), "Dropout": (6.08, 25.79, 1.79, 39.68),
                    "NoCycle": (5.20, 24.63, 1.80, 38.51), "SingleCycle": (5.55, 22.85, 2.03, 40.43),
                    "Snapshot a0=0.1": (4.99, 23.34, 1.64, 37.25), "Snapshot a0=0.2": (4.84, 21.93, 1.73, 36.61)},
    "DenseNet-100": {"Single": (3.74, 19.25), "Dropout": (3.65, 18.77), "NoCycle": (3.80, 19.30),
                     "SingleCycle": (4.39, 18.70), "Snapshot a0=0.1": (3.57, 18.12), "Snapshot a0=0.2": (3.44, 17.41)},
}
_LABEL = {"Single": "Single model", "Dropout": "Dropout", "NoCycle": "NoCycle Snapshot Ensemble",
          "SingleCycle": "SingleCycle Ensembles", "Snapshot a0=0.1": "Snapshot Ensemble (alpha0 = 0.1)",
          "Snapshot a0=0.2": "Snapshot Ensemble (alpha0 = 0.2)"}


def _table1() -> tuple[Cell, ...]:
    return tuple(Cell("table1", row, f"{ds}/{col}", value, "error_pct",
                      f"{PAPER}, Table 1 (test error %), row {row} / {_LABEL[col]}, column {ds}")
                 for row, by_col in _TABLE1.items() for col, values in by_col.items() for ds, value in zip(_T1_DATASETS, values))


# Table 2: ImageNet, ResNet-50, top-1 validation error (%), 90 epochs, batch 256.
_TABLE2 = {"ImageNet/Single": 24.01, "ImageNet/Snapshot M=2": 23.33, "ImageNet/Snapshot M=3": 23.96}
# Table 3: CIFAR-100, DenseNet-40, budget B = 300 epochs, alpha0 = 0.2, M snapshots.
_TABLE3 = {2: 22.92, 4: 22.07, 6: 21.93, 8: 21.89, 10: 22.16}

CELLS = (
    _table1()
    + tuple(Cell("table2", "ResNet-50", col, v, "error_pct", f"{PAPER}, Table 2 (ImageNet top-1 validation error %), "
                 f"row ResNet-50, column {col.split('/')[1]}") for col, v in _TABLE2.items())
    + tuple(Cell("table3", "DenseNet-40", f"C100/M={m}", v, "error_pct", f"{PAPER}, Table 3 (CIFAR-100 test error %, "
                 f"DenseNet-40, B = 300 epochs, alpha0 = 0.2), column M = {m}") for m, v in _TABLE3.items())
)


def table1_key(network: str, dataset: str, column: str) -> tuple[str, str, str] | None:
    """The Table 1 key of our ``(model name, dataset name, summary key)``, or None if the paper has no such label."""
    if network not in NETWORKS or dataset not in DATASETS or column not in COLUMNS:
        return None
    return ("table1", NETWORKS[network], f"{DATASETS[dataset]}/{COLUMNS[column]}")


def table3_key(num_snapshots: int) -> tuple[str, str, str]:
    """The Table 3 key of a DenseNet-40 / CIFAR-100 snapshot ensemble (alpha0 = 0.2) with ``num_snapshots`` cycles."""
    return ("table3", "DenseNet-40", f"C100/M={num_snapshots}")


# Sec. 4 (shared/reference/snapshot_ensembles.md, "Budgets used in the paper"): (epochs B, cycles M, batch) per
# dataset and network family; SGD Nesterov 0.9, weight decay 1e-4. Augmentation (not in the reference notes): CIFAR
# pad-crop-flip, SVHN none, as the paper's dataset paragraph and the DenseNet recipe it follows. Our networks at
# their defaults (model_kwargs {}) are the paper's.
_BUDGETS = {"C10": {"ResNet": (200, 5, 64), "DenseNet": (300, 6, 64)}, "C100": {"ResNet": (200, 5, 64), "DenseNet": (300, 6, 64)},
            "SVHN": {"ResNet": (40, 5, 64), "DenseNet": (40, 5, 64)}, "TinyImageNet": {"ResNet": (150, 6, 128), "DenseNet": (150, 6, 64)}}
_AUGMENT = {"C10": True, "C100": True, "SVHN": False}  # Tiny ImageNet: the reference does not say


def setting(key: tuple[str, str, str]) -> dict:
    """The paper's setting of the Table 1 or 3 cell ``key``: ``{epochs, M, batch_size, weight_decay,
    model_kwargs[, augment][, shortcut]}`` (names as in our configs; ``model_kwargs`` without the ResNet
    ``shortcut``, which is its own entry: 'A' for ResNet-110 and Wide-ResNet-32, the fb.resnet.torch CIFAR
    default the authors' code runs on); ``{}`` for Table 2 (not a grid we run)."""
    table, row, column = key
    if table not in ("table1", "table3"):
        return {}
    ds = column.split("/")[0]
    epochs, m, batch = _BUDGETS[ds]["DenseNet" if row.startswith("DenseNet") else "ResNet"]
    if table == "table3":  # B = 300 epochs, M = the column's
        m = int(column.split("M=")[1])
    out = {"epochs": epochs, "M": m, "batch_size": batch, "weight_decay": 1e-4, "model_kwargs": {}}
    if column.endswith(("/Single", "/Dropout")):  # one model with the single-model schedule: M plays no part
        del out["M"]
    if not row.startswith("DenseNet"):
        out["shortcut"] = "A"
    return {**out, "augment": _AUGMENT[ds]} if ds in _AUGMENT else out
