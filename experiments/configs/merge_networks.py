"""Config file of ``experiments/merge_networks.py``: teachers, merge stages and baselines; ``paper``:
the authors' ResNet-20 CIFAR-100 and VGG-11 (no BN) CIFAR-10 settings, one config group per row."""

from __future__ import annotations

import ml_collections

from mergejax.cli.merge import get_config as merge_config
from mergejax.config import replace, train_config
from mergejax.merging.pipeline import stage_steps

PRESETS = ("tiny", "digits", "paper", "smoke")
ROWS = ("resnet20_c100", "vgg11_c10")  # the paper preset's settings, each a config group of its own


def _row_config(row: str) -> ml_collections.ConfigDict:
    """One row of the ``paper`` preset: ``teacher`` (train_config) and ``merge`` (merge settings)."""
    r = ml_collections.ConfigDict()
    if row == "resnet20_c100":
        # fmfi-compbio/neural-network-merging, cifar100/: ResNet-20, SGD lr 0.1 momentum 0.9 wd 1e-4, batch 128,
        # teachers 200 epochs (x0.1 at 100, 150); gate stage and fine-tuning: mergejax.cli.merge.get_config('paper').
        r.teacher = train_config(dataset="cifar100", model="resnet20", batch_size=128, epochs=200.0, lr=0.1,
                                 weight_decay=1e-4, schedule="step", step_boundaries=(0.5, 0.75), augment=True,
                                 log_every=200, eval_every=0)
        r.merge = merge_config("paper")
    elif row == "vgg11_c10":
        # The authors' notebook cifar10_vgg11/Make student.ipynb loads two pretrained VGG-11 teachers (no BN, no
        # biases) whose training recipe is not in the repository; ours (our choice): SGD lr 0.05 momentum 0.9
        # wd 5e-4 (the notebook's gate-stage and fine-tune optimizer), batch 128, flip + pad-crop, 200 epochs,
        # x0.1 at 100 and 150. Gate stage and fine-tuning: mergejax.cli.merge.get_config('paper_vgg11')
        # (lambda 0.01, per-epoch step 0.01 before every epoch, 100 importance epochs, gate after each conv's ReLU).
        r.teacher = train_config(dataset="cifar10", model="vgg11_nobn", batch_size=128, epochs=200.0, lr=0.05,
                                 weight_decay=5e-4, schedule="step", step_boundaries=(0.5, 0.75), augment=True,
                                 log_every=200, eval_every=0)
        r.merge = merge_config("paper_vgg11")
    else:
        raise ValueError(f"unknown merge row {row!r}; available: {', '.join(ROWS)}")
    return r


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    """``teacher`` + ``merge`` (one setting), or with ``rows`` (the ``paper`` preset) one config
    group per row: ``--set rows=('vgg11_c10',)`` runs one of them."""
    c = ml_collections.ConfigDict()
    c.seeds, c.baselines = (0, 1, 2), ("long_teacher_flops", "naive_average", "aligned_average", "double_width_pruned")
    c.models_per_program = 0  # 2: both teachers in one vmapped program; 0 = auto (1 on CPU; GPU/TPU: if they fit)
    c.rows = ()  # empty: the top-level teacher/merge
    if preset == "paper":
        c.rows = ROWS
        for row in ROWS:
            c[row] = _row_config(row)
    elif preset == "smoke":  # seconds: the pipeline end to end (CI), not the method
        c.teacher = train_config(dataset="digits", model="cnn", model_kwargs={"width": 0.25}, batch_size=64, epochs=0.5,
                                 lr=0.1, schedule="cosine", log_every=11)
        c.merge = replace(merge_config("tiny"), model_kwargs={"width": 0.25}, gate_epochs=0.5, finetune_epochs=0.5,
                          log_every=11)
        c.seeds = (0,)
    else:  # tiny / digits: width-0.5 SmallCNN on digits; see merge_config for lambda and the gate lr
        c.teacher = train_config(dataset="digits", model="cnn", model_kwargs={"width": 0.5}, batch_size=64, epochs=6.0,
                                 lr=0.1, weight_decay=5e-4, schedule="cosine", log_every=22, checkpoint_every=220)
        c.merge = merge_config("tiny")
    return c


def settings(config: ml_collections.ConfigDict) -> list[tuple[str | None, ml_collections.ConfigDict]]:
    """``[(row name or None, config with that row's teacher/merge at the top level)]``."""
    if not config.rows:
        return [(None, config)]
    unknown = [r for r in config.rows if r not in config]
    if unknown:
        raise ValueError(f"rows {unknown} have no config group; available: {', '.join(r for r in ROWS if r in config)}")
    out = []
    for row in config.rows:
        c = ml_collections.ConfigDict({"seeds": config.seeds, "baselines": config.baselines, "rows": (),
                                       "models_per_program": config.models_per_program})
        c.teacher, c.merge = config[row].teacher, config[row].merge
        out.append((row, c))
    return out


def plan(config: ml_collections.ConfigDict) -> list[dict]:
    """One row per training run (the --dry-run contract): per seed the two teachers, the long
    teacher(s), the gate stage at double width, the fine-tuning, and the double-width baseline's
    three runs. Gate stages count as runs of the double-width network (``width_factor`` 2)."""
    from mergejax.cost import num_examples, plan_row

    rows = []
    for row, c in settings(config):
        T, G, F = c.teacher.epochs, c.merge.gate_epochs, c.merge.finetune_epochs
        n = num_examples(c.teacher.dataset, c.teacher.train_split)
        g_steps, f_steps = stage_steps(G, n, c.merge.batch_size)[0], stage_steps(F, n, c.merge.batch_size)[0]
        epochs = {"teacher_a": T, "teacher_b": T, "long_teacher": 2 * T + G + F}
        if "long_teacher_flops" in c.baselines:
            epochs["long_teacher_flops"] = 2 * T + 4 * G + F
        for seed in c.seeds:
            pre = f"{row}/seed{seed}" if row else f"seed{seed}"
            for name, e in epochs.items():
                rows.append(plan_row(f"{pre}/{name}", replace(c.teacher, epochs=float(e))))
            merge_runs = [("gates", g_steps, 2.0), ("merged", f_steps, 1.0)]
            if "double_width_pruned" in c.baselines:
                rows.append(plan_row(f"{pre}/double_width", replace(c.teacher, epochs=float(2 * T)), width_factor=2.0))
                merge_runs += [("double_width_gates", g_steps, 2.0), ("double_width_pruned", f_steps, 1.0)]
            for name, steps, wf in merge_runs:
                rows.append(plan_row(f"{pre}/{name}", c.teacher, steps=steps, batch_size=int(c.merge.batch_size),
                                     width_factor=wf))
    return rows
