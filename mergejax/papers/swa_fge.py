"""Reference points of SWA (Izmailov et al. 2018) and FGE (Garipov et al. 2018): CIFAR-100, WRN-28-10,
test accuracy (%), as quoted in ``shared/reference/snapshot_ensembles.md`` ("Neighbours").

Budgets are in units of the single model's training budget (SWA: 1.5 budgets; FGE and the
independently trained ensemble it is compared with: 1 budget).
"""

from __future__ import annotations

from mergejax.papers import Cell

SWA = "Izmailov, Podoprikhin, Garipov, Vetrov, Wilson 2018, Averaging Weights Leads to Wider Optima (UAI)"
FGE = "Garipov, Izmailov, Podoprikhin, Vetrov, Wilson 2018, Loss Surfaces, Mode Connectivity, and Fast Ensembling (NeurIPS)"

CELLS = (
    Cell("swa", "WRN-28-10", "C100/SGD", 80.82, "accuracy_pct",
         f"{SWA}, Table 1, CIFAR-100, row WRN-28-10, column SGD (conventional training, 1 budget)"),
    Cell("swa", "WRN-28-10", "C100/SWA 1.5 budgets", 82.15, "accuracy_pct",
         f"{SWA}, Table 1, CIFAR-100, row WRN-28-10, column SWA 1.5 budgets"),
    Cell("fge", "WRN-28-10", "C100/Ind 1 budget", 80.8, "accuracy_pct",
         f"{FGE}, CIFAR-100 ensembles at 1 budget, row WRN-28-10, column Ind (independently trained networks)"),
    Cell("fge", "WRN-28-10", "C100/FGE 1 budget", 82.3, "accuracy_pct",
         f"{FGE}, CIFAR-100 ensembles at 1 budget, row WRN-28-10, column FGE"),
)

#: why these cells stand beside the snapshot experiment's comparison unrun
NOT_RUN = ("no preset trains WRN-28-10 on CIFAR-100 for SWA / FGE; the snapshot experiment's swa and fge extras "
           "run on its own grid's networks")
