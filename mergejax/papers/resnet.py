"""He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv 1512.03385):
Table 6, CIFAR-10 test error (%) of the CIFAR ResNets, the ``train_baseline`` paper preset's reference.

ResNet-110 is printed as "6.43 (6.61±0.16)": the best of 5 runs and their mean ± std; both are cells
here (the other depths are single numbers). :data:`SETTING`: Sec. 4.2's training, in our config's
names: batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 32k and 48k
iterations, stopped at 64k, 4-pixel pad + 32x32 crop + flip, and option A shortcuts (identity,
zero-padded channels) in every CIFAR network. Not in :data:`SETTING`: the 45k/5k split that fixed
the schedule, and ResNet-110's warm-up (lr 0.01 for the first 400 iterations).
"""

from __future__ import annotations

from mergejax.papers import Cell, arch_kwargs, deviations, side_by_side

PAPER = "He et al. 2016, Deep Residual Learning for Image Recognition (CVPR), Table 6 (CIFAR-10 test error %)"
NETWORKS = {f"resnet{d}": f"ResNet-{d}" for d in (20, 32, 44, 56, 110, 1202)}
_TABLE6 = {"ResNet-20": 8.75, "ResNet-32": 7.51, "ResNet-44": 7.17, "ResNet-56": 6.97, "ResNet-110": 6.43, "ResNet-1202": 7.93}

CELLS = (
    *(Cell("table6", row, "C10", v, "error_pct", f"{PAPER}, row {row}" + (" (best of 5 runs)" if row == "ResNet-110" else ""))
      for row, v in _TABLE6.items()),
    Cell("table6", "ResNet-110", "C10 (mean of 5 runs)", 6.61, "error_pct", f"{PAPER}, row ResNet-110, '(6.61±0.16)': mean ± std of 5 runs"),
)

SETTING = {"steps": 64_000, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
           "schedule": "step", "step_boundaries": (0.5, 0.75), "augment": True, "shortcut": "A", "model_kwargs": {}}


def shortcut_of(model: str, model_kwargs: dict) -> str:
    """The ResNet shortcut a run used: ``model_kwargs['shortcut']``, else the model's default (``'B'`` for a model
    without the field)."""
    if "shortcut" in model_kwargs:
        return model_kwargs["shortcut"]
    from mergejax.core.models import make_model

    return getattr(make_model(model, 10), "shortcut", "B")


def compare(train: dict, runs: list[dict]) -> dict:
    """:func:`mergejax.papers.side_by_side` of Table 6 with a ``train_baseline`` run: ``train`` is its train
    config (a dict), ``runs`` its seeds (``test_accuracy`` fraction, ``steps``). Ours (mean test error %) is set
    beside the model's row on CIFAR-10 only (the best-of-5 and the mean cell alike for ResNet-110), each with its
    ``deviations`` from :data:`SETTING` (steps run, batch, optimizer, schedule, augmentation, shortcut, width ...)."""
    ours, devs, row = {}, {}, NETWORKS.get(train["model"])
    if row is None or train["dataset"] != "cifar10" or not runs:
        return side_by_side(CELLS, {})
    kw = dict(train.get("model_kwargs") or {})
    mine = {**{k: train[k] for k in SETTING if k in train}, "steps": runs[0]["steps"], "shortcut": shortcut_of(train["model"], kw),
            "model_kwargs": arch_kwargs(kw, "shortcut")}
    err = 100 * (1 - sum(r["test_accuracy"] for r in runs) / len(runs))
    for c in CELLS:
        if c.row == row:
            ours[c.key], devs[c.key] = err, deviations(mine, SETTING)
    return side_by_side(CELLS, ours, devs)
