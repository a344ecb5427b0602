"""Config file of ``experiments/train_baseline.py``: one model on one dataset per preset."""

from __future__ import annotations

import ml_collections

from mergejax import cost
from mergejax.config import train_config

PRESETS = ("tiny", "digits", "smoke", "paper")


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seeds = (0,)
    # seeds trained together in one vmapped program (mergejax.run.seed_groups); 0 = auto: 1 on CPU,
    # on a GPU/TPU as many as fit in free device memory
    c.models_per_program = 0
    if preset in ("tiny", "digits"):
        c.train = train_config(dataset="digits", model="cnn", batch_size=64, epochs=15, lr=0.1, weight_decay=5e-4,
                               log_every=11)
    elif preset == "smoke":  # seconds: checks the pipeline end to end (CI), not the method
        c.train = train_config(dataset="digits", model="cnn", model_kwargs={"width": 0.25}, batch_size=64, steps=20,
                               lr=0.1, log_every=10, checkpoint_every=5)
    elif preset == "paper":
        # He et al. 2016, Sec. 4.2: batch 128, SGD momentum 0.9, wd 1e-4, lr 0.1 divided by 10 at
        # 32k and 48k iterations, stop at 64k (= 50% and 75% of training); pad-crop-flip; identity
        # shortcuts zero-padded where the width doubles (option A; our ResNet's default is B).
        c.train = train_config(dataset="cifar10", model="resnet20", model_kwargs={"shortcut": "A"}, batch_size=128,
                               steps=64_000, lr=0.1, momentum=0.9,
                               weight_decay=1e-4, schedule="step", step_boundaries=(0.5, 0.75), augment=True,
                               log_every=200, eval_every=2000, checkpoint_every=2000)
    return c


def plan(config: ml_collections.ConfigDict) -> list[dict]:
    """One training run per seed (for ``--dry-run``; seeds vmapped together count as their sum)."""
    return [cost.plan_row(f"seed{seed}", config.train) for seed in config.seeds]
