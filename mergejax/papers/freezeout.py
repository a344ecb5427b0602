"""FreezeOut (Brock, Lim, Ritchie, Weston 2017, arXiv 1706.04983): the numbers the paper and its
code state.

Table ``flop_estimate``: the authors' own predicted saving of training FLOPs for their default
network, DenseNet-BC L=76 k=12 on 32x32 inputs, from ``calc_speedup(growthRate=12,
nDenseBlocks=12, t_0, how_scale)`` in ajbrock/FreezeOut utils.py (backward counted as equal to
the forward; every layer's forward always runs, a layer's backward stops at its t_i). Note: that
function multiplies the *linear* saving by 1.3 (an empirical factor in the code, not a FLOP
count); the plain FLOP model gives 24.2/20.8/17.3/13.8/10.4/6.9/3.5 % for linear t0 = 0.3..0.9.
The published linear values are kept as printed. Column: ``"<spacing> t0=<t0>"`` (t0 as the
user gives it, before the power); the estimate does not depend on scaled/unscaled.

Table ``abstract``: the abstract's claims that carry a number (arXiv v2): "savings of up to 20%
wall-clock time during training with 3% loss in accuracy for DenseNets, a 20% speedup without
loss of accuracy for ResNets". "No improvement for VGG networks" has no number and is in
:data:`CLAIMS` only. The dataset is CIFAR (the code's default is CIFAR-100, which the authors'
runs used); ``accuracy_loss_pct`` is in percentage points of accuracy as the abstract words it
(the README calls the envelope "3% relative error", which is ambiguous).
"""

from mergejax.papers import Cell, arch_kwargs, deviations, side_by_side

_CODE = "ajbrock/FreezeOut utils.py calc_speedup(12, 12, t_0, how_scale): DenseNet-BC L=76 k=12 FLOP estimate"
_ABSTRACT = "Brock et al. 2017, arXiv 1706.04983v2, abstract"
DENSENET_BC76 = "DenseNet-BC (L=76, k=12)"

_CUBIC = {0.5: 34.8, 0.6: 30.3, 0.7: 24.6, 0.8: 17.8, 0.9: 9.6}
_LINEAR = {0.3: 31.5, 0.4: 27.0, 0.5: 22.5, 0.6: 18.0, 0.7: 13.5, 0.8: 9.0, 0.9: 4.5}


def flop_column(spacing: str, t0: float) -> str:
    """The ``flop_estimate`` column of a sweep point, e.g. ``'cubic t0=0.8'``."""
    return f"{spacing} t0={t0:g}"


CELLS = (
    *(Cell("flop_estimate", DENSENET_BC76, flop_column("cubic", t0), v, "flop_saving_pct", f"{_CODE}, cubic, t_0={t0:g}")
      for t0, v in _CUBIC.items()),
    *(Cell("flop_estimate", DENSENET_BC76, flop_column("linear", t0), v, "flop_saving_pct",
           f"{_CODE}, linear, t_0={t0:g} (includes the code's x1.3 factor for linear)")
      for t0, v in _LINEAR.items()),
    Cell("abstract", "DenseNet", "C100/best speedup", 20.0, "speedup_pct", f"{_ABSTRACT}: 'savings of up to 20% wall-clock time'"),
    Cell("abstract", "DenseNet", "C100/accuracy loss", 3.0, "accuracy_loss_pct", f"{_ABSTRACT}: 'with 3% loss in accuracy for DenseNets'"),
    Cell("abstract", "ResNet", "C100/best speedup", 20.0, "speedup_pct", f"{_ABSTRACT}: 'a 20% speedup ... for ResNets'"),
    Cell("abstract", "ResNet", "C100/accuracy loss", 0.0, "accuracy_loss_pct", f"{_ABSTRACT}: 'without loss of accuracy for ResNets'"),
)

# Claims without a number (shown beside the comparison, never compared).
CLAIMS = (
    f"{_ABSTRACT}: 'no improvement for VGG networks'. Note: the authors' vgg.py never advances its step "
    "counter, so no VGG layer ever froze in their code.",
    "ajbrock/FreezeOut README: 'speedups below 20% should be within a 3% relative error envelope, and speedups "
    "around 10% seem to incur no error cost for Scaled Cubic and Unscaled Linear strategies'.",
)

# the abstract's row for each network family of the FreezeOut experiment
ABSTRACT_ROWS = {"densenet_bc76": "DenseNet", "wrn40_4": "ResNet", "resnet56": "ResNet"}
# the authors' networks as our model kwargs (ajbrock/FreezeOut: DenseNet-BC L=76 k=12, WRN-40-4); a run with
# other kwargs (a width, a depth) is flagged beside the cells it fills
MODEL_KWARGS = {"densenet_bc76": {}, "wrn40_4": {"depth": 40, "widen": 4}, "resnet56": {}}


def compare(runs: list[dict], dataset: str, model_kwargs: dict | None = None) -> dict:
    """:func:`mergejax.papers.side_by_side` of these cells with a sweep's ``runs`` (each with ``network``,
    ``label``, ``spacing``, ``t0``, ``scaled``, ``predicted_saving``, ``measured_saving``,
    ``test_accuracy``): flop_estimate: ours = the predicted saving (%, XLA FLOPs per compiled stage)
    of DenseNet-BC-76, compared only at the real depth 76 (``model_kwargs``: network -> the kwargs
    it ran with); abstract (CIFAR-100 only): ours = the largest measured wall-clock saving among
    points whose accuracy loss against the baseline is within the paper's, and that loss. Each row's
    ``deviations``: the network's ``model_kwargs`` where they differ from :data:`MODEL_KWARGS`."""
    ours, devs, kw = {}, {}, (model_kwargs or {}).get("densenet_bc76", {})

    def flag(net):  # deviations of network ``net``'s kwargs (none known: none flagged)
        if net not in (model_kwargs or {}) or net not in MODEL_KWARGS:
            return []
        return deviations({"model_kwargs": arch_kwargs(model_kwargs[net])}, {"model_kwargs": MODEL_KWARGS[net]})

    for r in runs:  # predicted FLOP saving of DenseNet-BC-76 (scaled and unscaled plan the same freeze steps)
        if r.get("network") == "densenet_bc76" and r["label"] != "baseline" and kw.get("depth", 76) == 76:
            key = ("flop_estimate", DENSENET_BC76, flop_column(r["spacing"], r["t0"]))
            if r["scaled"] or key not in ours:
                ours[key], devs[key] = 100 * r["predicted_saving"], flag("densenet_bc76")
    budget = {c.row: c.value for c in CELLS if c.table == "abstract" and c.metric == "accuracy_loss_pct"}
    for net, row in ABSTRACT_ROWS.items():
        mine = [r for r in runs if r.get("network") == net]
        base = [r["test_accuracy"] for r in mine if r["label"] == "baseline"]
        if not mine or not base or dataset != "cifar100":
            continue
        ref = 100 * sum(base) / len(base)
        ok = [(100 * r["measured_saving"], ref - 100 * r["test_accuracy"]) for r in mine
              if r["label"] != "baseline" and r["measured_saving"] is not None and ref - 100 * r["test_accuracy"] <= budget[row]]
        if ok:
            for column, v in zip(("C100/best speedup", "C100/accuracy loss"), max(ok)):
                ours[("abstract", row, column)], devs[("abstract", row, column)] = v, flag(net)
    return side_by_side(CELLS, ours, devs)
