"""Config file of ``experiments/averaging.py``: (a) local SGD vs gradient averaging, (b) naive vs
aligned interpolation, (c) soups, (d) local SGD across 2 processes."""

from __future__ import annotations

import ml_collections

from mergejax.averaging import distributed

PRESETS = ("tiny", "smoke", "paper")


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        dataset="digits", seeds=(0, 1, 2),
        # (a) local SGD vs gradient averaging; with momentum 0.9 the effective step is lr / (1 - 0.9) = 0.1
        hidden=(64,), workers=4, worker_batch=16, total_steps=128, ks=(1, 2, 8, 32, 128), lr_sgd=0.05, lr_momentum=0.01,
        # (b) two independent networks; (c) soups of fine-tunes with these learning rates
        pair_hidden=(256,), pair_steps=600, pair_lr=0.05, batch_size=64, interp_points=11,
        soup_pretrain_steps=300, soup_finetune_steps=150, soup_lrs=(0.003, 0.01, 0.03, 0.1, 0.3), val_fraction=0.2,
        two_process=True, checkpoint_every=300,  # (d); steps between fit checkpoints in (b), (c)
        models_per_program=0,  # 2: (b)'s two networks in one vmapped program; 0 = auto (1 on CPU; an accelerator: if they fit)
        devices=0))  # local devices (0 = all; 1 = one): (b)'s vmapped program spreads its networks over them; one network's
        # fit (the solo pair, soup pretrain and fine-tunes) splits each batch over them (batch_size must divide)
    if preset == "paper":
        # The papers' CIFAR-10-scale runs are out of reach on CPU; the same protocol on MNIST with wider MLPs
        # (Ainsworth et al. 2022 match a 3x512 MLP on MNIST; Wortsman et al. 2022 soup 72 fine-tunes).
        c.update(dataset="mnist", hidden=(512, 512, 512), pair_hidden=(512, 512, 512), workers=8, worker_batch=64, total_steps=1024,
                 pair_steps=6000, soup_pretrain_steps=3000, soup_finetune_steps=1000, checkpoint_every=1000)
    elif preset == "smoke":  # seconds: the pipeline end to end (CI), not the method; no second process
        c.update(seeds=(0,), hidden=(16,), workers=2, worker_batch=8, total_steps=8, ks=(1, 4), pair_hidden=(32,), pair_steps=30,
                 interp_points=3, soup_pretrain_steps=20, soup_finetune_steps=10, soup_lrs=(0.01, 0.1), two_process=False,
                 checkpoint_every=10)
    return c


def plan(config: ml_collections.ConfigDict) -> list[dict]:
    """Every training run of :func:`run` (for ``--dry-run``); evaluations are not counted.

    (a) per optimizer and seed: the synchronous run plus one local-SGD run per K, each
    ``total_steps`` steps of the global batch ``workers x worker_batch``; (b) two networks per
    seed; (c) a pre-training and one fine-tune per learning rate; (d) 2 processes x the fixed
    rounds of :mod:`mergejax.averaging.distributed` (MLP 16 on 8x8 inputs, batch 8).
    """
    def row(name, hidden, steps, batch, dataset=config.dataset):
        return {"name": name, "model": "mlp", "model_kwargs": {"hidden": tuple(hidden)}, "dataset": dataset,
                "steps": int(steps), "batch_size": int(batch), "width_factor": 1.0}
    rows = []
    for s in config.seeds:
        for opt in ("sgd", "momentum"):
            for run_name in ("sync", *(f"K{k}" for k in config.ks)):
                rows.append(row(f"divergence/{opt}/seed{s}/{run_name}", config.hidden, config.total_steps,
                                config.workers * config.worker_batch))
        rows += [row(f"interp/seed{s}/net{j}", config.pair_hidden, config.pair_steps, config.batch_size) for j in (0, 1)]
        rows.append(row(f"soups/seed{s}/pretrain", config.hidden, config.soup_pretrain_steps, config.batch_size))
        rows += [row(f"soups/seed{s}/finetune{i}", config.hidden, config.soup_finetune_steps, config.batch_size)
                 for i in range(len(config.soup_lrs))]
    if config.two_process:
        rows.append(row("two_process", (16,), 2 * distributed.ROUNDS * distributed.LOCAL_STEPS, 8, dataset="digits"))
    return rows
