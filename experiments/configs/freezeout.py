"""Config file of ``experiments/freezeout.py``: the FreezeOut sweep (t0 x spacing x scaled) around one
training per network; ``paper*``: Brock et al. 2017's networks on CIFAR-100 with a 45k/5k split."""

from __future__ import annotations

import ml_collections

from mergejax.config import placeholder, replace, to_dict, train_config
from mergejax.freezeout import sweep

PRESETS = ("tiny", "digits", "paper", "paper_resnet", "paper_vgg", "smoke")
# The networks of the authors' code (ajbrock/FreezeOut): densenet.py's default DenseNet-BC L=76 k=12; WRN.py (their
# "ResNets"; WRN-40-4 is our pick of depth/width, their script passes -L/-k to it); vgg.py's cfg 'E' with BN
# (13 conv-BN-ReLU layers = our VGG-16).
NETWORKS = {"densenet_bc76": ("densenet_bc76", {}), "wrn40_4": ("wrn", {"depth": 40, "widen": 4}),
            "vgg16": ("vgg16", {}), "resnet56": ("resnet56", {})}
PAPER_NETWORKS = {"paper": ("densenet_bc76", "wrn40_4", "vgg16"), "paper_resnet": ("wrn40_4",), "paper_vgg": ("vgg16",)}


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    """``train``: one training (``lr`` = alpha(0); its ``schedule`` is unused) and the sweep around it.
    ``networks`` (paper presets): the sweep runs once per network; the group of that name gives its
    ``model`` and ``model_kwargs`` (replacing ``train.model``); ``train.model_kwargs`` apply to every
    network unless its group sets the same key, e.g. ``--set train.model_kwargs.width=0.25``.
    ``validation``: examples held out of the training split and evaluated instead of the test split
    (0: train on all, evaluate on test), drawn with ``validation_seed``."""
    sgd = dict(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=1e-4)
    c = ml_collections.ConfigDict()
    c.networks = ()
    c.validation, c.validation_seed = 0, 0
    if preset in PAPER_NETWORKS:
        # Brock et al. 2017 / ajbrock/FreezeOut train.py defaults: CIFAR-100, 100 epochs, batch 50, SGD Nesterov 0.9,
        # wd 1e-4, alpha(0) = 0.1, augmentation on, validation on the last 5,000 training images (45k/5k; ours: a
        # seeded draw). Unlike the authors' code (1000 iterations per epoch assumed), T is the real number of steps
        # (900 per epoch). checkpoint_every is a multiple of log_every, so a resumed unit logs the same losses.
        c.networks = PAPER_NETWORKS[preset]
        for net, (m, kw) in NETWORKS.items():  # one group per network: --set densenet_bc76.model_kwargs.dropout=0.2
            c[net] = ml_collections.ConfigDict({"model": m, "model_kwargs": ml_collections.ConfigDict(kw)})
        model = NETWORKS[c.networks[0]][0]
        c.train = train_config(dataset="cifar100", model=model, batch_size=50, epochs=100.0, lr=0.1, augment=True,
                               log_every=450, checkpoint_every=4500, **sgd)
        c.validation = 5000
    elif preset == "smoke":
        # Seconds: the pipeline end to end (CI), not the method; a mid-run checkpoint exercises the resume.
        c.train = train_config(dataset="digits", model="mlp", model_kwargs={"hidden": (32,) * 3}, batch_size=128, steps=20,
                               lr=0.05, log_every=10, checkpoint_every=10, **sgd)
    else:
        # tiny: 7 layers, ~20 epochs: a meaningful prefix; accuracy differences below ~1% are noise. One
        # checkpoint, at the end: a unit is ~1 s and a save inside the loop would be timed.
        c.train = train_config(dataset="digits", model="mlp", model_kwargs={"hidden": (256,) * 6}, batch_size=128, steps=220,
                               lr=0.05, log_every=220, checkpoint_every=220, **sgd)
    smoke, paper = preset == "smoke", preset in PAPER_NETWORKS
    # paper: every t0 of the authors' FLOP estimates (cubic 0.5-0.9, linear 0.3-0.9), all three spacings
    c.t0s = (0.5,) if smoke else (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9) if paper else (0.5, 0.6, 0.7, 0.8, 0.9)
    c.spacings = ("cubic",) if smoke else ("linear", "squared", "cubic") if paper else ("linear", "cubic")
    c.scalings = (True,) if smoke else (True, False)
    c.max_stages = placeholder(int)  # bound on compiled steps per run (None: one per layer)
    c.seeds = (0,)
    # timed trainings per point (identical results; the minimum time is kept: interference only adds time)
    c.repeats = 2 if preset in ("tiny", "digits") else 1
    c.baseline_every = 4  # re-time the no-freeze baseline after every this many points (0: first and last only)
    return c


def networks(config: ml_collections.ConfigDict) -> list[tuple[str | None, ml_collections.ConfigDict]]:
    """``[(network name or None, its train config)]``: one per entry of ``networks`` (or just ``train``)."""
    if not config.networks:
        return [(None, config.train)]
    out = []
    for net in config.networks:
        group = config.get(net)
        if not isinstance(group, ml_collections.ConfigDict) or "model" not in group:
            raise ValueError(f"unknown FreezeOut network {net!r}; available: {', '.join(n for n in NETWORKS if n in config)}")
        kwargs = {**to_dict(config.train.model_kwargs), **to_dict(group.model_kwargs)}
        out.append((net, replace(config.train, model=group.model, model_kwargs=kwargs)))
    return out


def sweep_points(config: ml_collections.ConfigDict) -> list[tuple]:
    """The timed points of one seed and network, baselines included, in timing order."""
    return sweep.points(config.t0s, config.spacings, config.scalings, config.baseline_every)


def plan(config: ml_collections.ConfigDict) -> list[dict]:
    """One row per timed training (the --dry-run contract): every sweep point and baseline
    timing, ``repeats`` times, per seed and network. Steps are the run's T (FreezeOut skips
    part of the backward, so the FLOPs are an upper bound; the run predicts the saving)."""
    from mergejax.cost import num_examples, plan_row
    from mergejax.run import num_steps

    rows = []
    for net, tc in networks(config):
        n = num_examples(tc.dataset, tc.train_split) - config.validation
        total, _ = num_steps(tc, n)
        for seed in config.seeds:
            for j, point in enumerate(sweep_points(config)):
                for r in range(config.repeats):
                    name = (f"{net}/" if net else "") + f"seed{seed}/{j:02d}-{sweep.point_slug(point)}" + (f"/repeat{r}" if r else "")
                    rows.append(plan_row(name, tc, steps=total))
    return rows
