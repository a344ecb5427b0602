"""Merging of neural networks (Pašen & Boža 2022, arXiv 2204.09973): the numbers available offline.

Table ``cifar10_vgg11``: the authors' notebook fmfi-compbio/neural-network-merging
``cifar10_vgg11/Make student.ipynb`` at commit df6aee3 ("cleanup and rerun"; an older commit,
04b3d7d, prints other cell outputs: 0.8039, 0.7957, 0.9115) (two VGG-11 teachers without BatchNorm, merged, gated for
100 epochs, compressed, fine-tuned for 100 epochs), test accuracy in %. "at the start of the
gate stage" is the big student evaluated right after concatenation with its (random) gates;
"right after compression" keeps the gate values out of the weights. Columns ``C10/OT fusion``
are not the notebook's: OT fusion (Singh & Jaggi 2020) merging the same kind of VGG-11 teachers
with no training, 85.98 and 86.51, kept for reference (compare with our big student at step 0
and our aligned average).

The paper's own tables (CIFAR-100 ResNet-20: teacher, long teacher, merged student; arXiv
2204.09973v2, journal version Neural Processing Letters 2024) were not available offline, so
no cell of them is here: the ``paper`` preset's ResNet-20 row is our measured table, with
nothing published to compare it with. No number is invented.

:data:`VGG11_SETTING`: the notebook's settings (shared/reference/merging.md, "Other settings";
the optimizers as :func:`mergejax.cli.merge.get_config` ``paper_vgg11`` transcribes them), and
:data:`VGG11_SETTING_KEYS` which of them each cell depends on, so that a run at other settings
is flagged (:func:`mergejax.papers.deviations`). The teachers' own recipe is not in the
repository, so it is not compared.
"""

from mergejax.papers import Cell

_NB = "fmfi-compbio/neural-network-merging cifar10_vgg11/Make student.ipynb (commit df6aee3)"
VGG11 = "VGG-11 (no BN)"
_OT_NOTE = "another method: OT fusion (no training) set beside our permutation-aligned weight average"

CELLS = (
    Cell("cifar10_vgg11", VGG11, "C10/big student, gate stage start", 80.0, "accuracy_pct",
         f"{_NB}: big student test accuracy after concatenation, random gates (cell output 0.8003)"),
    Cell("cifar10_vgg11", VGG11, "C10/big student, gate stage end", 90.3, "accuracy_pct",
         f"{_NB}: after 100 epochs of gate learning"),
    Cell("cifar10_vgg11", VGG11, "C10/after compression", 79.9, "accuracy_pct",
         f"{_NB}: right after compression, gate values not folded into the weights (cell output 0.7989)"),
    Cell("cifar10_vgg11", VGG11, "C10/after fine-tuning", 91.13, "accuracy_pct", f"{_NB}: after 100 epochs of fine-tuning (last epoch, 0.9113)"),
    Cell("cifar10_vgg11", VGG11, "C10/after fine-tuning (best epoch)", 91.23, "accuracy_pct",
         f"{_NB}: best test accuracy during fine-tuning"),
    Cell("cifar10_vgg11", VGG11, "C10/OT fusion", 85.98, "accuracy_pct",
         "Singh & Jaggi 2020, Model Fusion via Optimal Transport: VGG-11 CIFAR-10 teachers fused with no training (first of the two values the reference notes quote)",
         _OT_NOTE),
    Cell("cifar10_vgg11", VGG11, "C10/OT fusion (second value)", 86.51, "accuracy_pct",
         "Singh & Jaggi 2020, Model Fusion via Optimal Transport: VGG-11 CIFAR-10 (second of the two values the reference notes quote)",
         _OT_NOTE),
)

#: The notebook's settings of the VGG-11 row (names as in the merge config; model and kwargs: the teachers').
VGG11_SETTING = {"model": "vgg11_nobn", "model_kwargs": {}, "batch_size": 128, "gate_epochs": 100, "lambda0": 0.01,
                 "lambda_step": 0.01, "lr": 0.05, "weight_decay": 5e-4, "gate_lr": 0.2, "log_alpha_mean": 1.0,
                 "finetune_epochs": 100, "finetune_lr": 0.05}
_ARCH = ("model", "model_kwargs")
_GATES = _ARCH + ("batch_size", "gate_epochs", "lambda0", "lambda_step", "lr", "weight_decay", "gate_lr", "log_alpha_mean")
#: column -> the settings its number depends on
VGG11_SETTING_KEYS = {"C10/big student, gate stage start": _ARCH, "C10/big student, gate stage end": _GATES,
                      "C10/after compression": _GATES, "C10/after fine-tuning": _GATES + ("finetune_epochs", "finetune_lr"),
                      "C10/after fine-tuning (best epoch)": _GATES + ("finetune_epochs", "finetune_lr"),
                      "C10/OT fusion": _ARCH, "C10/OT fusion (second value)": _ARCH}
