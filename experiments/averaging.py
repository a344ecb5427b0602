"""Averaging gradients vs averaging weights (issue 3). ``python experiments/averaging.py [--preset smoke] [--set seeds=(0,)]``

(a) local SGD (K local steps, then average weights) vs synchronous gradient averaging on the same batches, for SGD
    and momentum; (b) naive vs weight-matched (Git Re-Basin) interpolation of two independently trained networks;
(c) best single vs uniform vs greedy soup of fine-tunes; (d) local SGD across 2 real processes (jax.distributed). Units (re-runs
read finished ones): ``divergence/<opt>/seed<s>``, ``interp/seed<s>/net0|net1|path`` (``nets``: both in one vmapped program with
``models_per_program`` 2), ``soups/seed<s>/pretrain|finetune<i>|soup``, ``two_process``; (b), (c) ``fit`` in ``<unit>/fit``.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import ml_collections
import numpy as np

from mergejax import report
from mergejax.averaging import connectivity, distributed, local_sgd, report as averaging_report, soups
from mergejax.averaging.parallel import resolve_devices
from mergejax.config import to_dict
from mergejax.core import checkpoint, data as data_lib
from mergejax.core.loop import evaluate, fit
from mergejax.core.models import make_model
from mergejax.core.multi import fit_members, models_per_program, step_memory_bytes
from mergejax.core.optim import make_optimizer
from mergejax.core.train import create_state
from mergejax.experiment import config_file, experiment_main, unit

NAME, ORDER = "averaging", 10
CONFIG = config_file(__file__)  # configs/averaging.py
PRESETS, get_config, plan = CONFIG.PRESETS, CONFIG.get_config, CONFIG.plan


def _pick(config, *keys, **extra) -> dict:
    return {"dataset": config.dataset, **{k: config[k] for k in keys}, **extra}


def _fit(out_dir, name, cfg, start, split, evals, *, steps, seed, config, progress, inputs=None) -> dict:
    """Unit ``name``: ``fit`` ``start()`` in ``<unit>/fit`` (checkpointed, resumed); returns ``{eval split: metrics}``."""
    def fn(workdir):
        state, _ = fit(start(), split, num_steps=steps, batch_size=config.batch_size, seed=seed, progress=progress,  # batch split
                       manifest=cfg, workdir=os.path.join(workdir, "fit"), checkpoint_every=config.checkpoint_every,  # over devices
                       devices=resolve_devices(config.devices, config.batch_size))
        return {k: evaluate(state, s) for k, s in evals.items()}
    return unit(out_dir, name, cfg, fn, inputs=inputs)


def _restore(out_dir, name, like):
    """``like`` (a state) with the final arrays of unit ``name``'s ``fit`` run."""
    return like.replace_arrays(checkpoint.Manager(os.path.join(out_dir, "units", name, "fit", "checkpoints")).restore(like.arrays()))


def divergence(config, out_dir, opt, seed, train, test):
    model, shape = make_model("mlp", train.num_classes, hidden=config.hidden), (1, *train.images.shape[1:])
    tx = make_optimizer("sgd", config.lr_sgd, momentum=0.0) if opt == "sgd" else make_optimizer("sgd", config.lr_momentum, momentum=0.9)
    cfg = _pick(config, "hidden", "workers", "worker_batch", "total_steps", "ks", "lr_sgd", "lr_momentum", optimizer=opt, seed=seed)
    kw = dict(num_steps=config.total_steps, batch_size=config.workers * config.worker_batch, seed=seed)

    def fn(workdir):  # synchronous: fit on global batches of W * b; local SGD shards the same stream (seconds: not checkpointed)
        sync, _ = fit(create_state(model, jax.random.key(seed), shape, tx), train, **kw, progress=False)
        rows = local_sgd.divergence(create_state(model, jax.random.key(seed), shape, tx), sync, train, test,
                                    num_workers=config.workers, ks=config.ks, **kw)
        return {"rows": [{"optimizer": opt, "seed": seed, **r} for r in rows]}
    return unit(out_dir, f"divergence/{opt}/seed{seed}", cfg, fn)["rows"]


def aligned_pair(config, out_dir, seed, train, test, progress):
    model, tx = make_model("mlp", train.num_classes, hidden=config.pair_hidden), make_optimizer("sgd", config.pair_lr, momentum=0.9)
    fresh = lambda key: create_state(model, jax.random.key(key), (1, *train.images.shape[1:]), tx)  # noqa: E731
    cfg = _pick(config, "pair_hidden", "pair_steps", "pair_lr", "batch_size", seed=seed)
    names = [f"interp/seed{seed}/net{j}" for j in (0, 1)]  # network j: init key 1000 + 2 seed + j, data order 2 seed + j
    if models_per_program(config.models_per_program, 2, bytes_per_model=lambda: step_memory_bytes(
            fresh(0), train.images.shape[1:], config.batch_size)) == 2:  # one vmapped program: unit interp/seed<s>/nets
        def pair(workdir):  # each trained network's {'params', 'batch_stats'} in <unit>/net<j>
            nets, _ = fit_members([fresh(1000 + 2 * seed + j) for j in (0, 1)], train, workdir, ["net0", "net1"],
                                  seeds=[2 * seed + j for j in (0, 1)], num_steps=config.pair_steps, batch_size=config.batch_size,
                                  checkpoint_every=config.checkpoint_every, progress=progress, manifest=cfg,
                                  devices=resolve_devices(config.devices))  # one net per device if 2+
            return {n: {"test": evaluate(fresh(0).replace(**v), test)} for n, v in nets.items()}
        inputs = {f"interp/seed{seed}/nets": unit(out_dir, f"interp/seed{seed}/nets", {**cfg, "nets": [0, 1]}, pair)}
        restore = lambda j: fresh(0).replace(**checkpoint.load(os.path.join(  # noqa: E731
            out_dir, "units", f"interp/seed{seed}/nets", f"net{j}")))
    else:
        inputs = {names[j]: _fit(out_dir, names[j], {**cfg, "net": j}, lambda j=j: fresh(1000 + 2 * seed + j), train, {"test": test},
                                 steps=config.pair_steps, seed=2 * seed + j, config=config, progress=progress) for j in (0, 1)}
        restore = lambda j: _restore(out_dir, names[j], fresh(0))  # noqa: E731

    def fn(workdir):
        (a, b), ts = (restore(0), restore(1)), np.linspace(0, 1, config.interp_points)
        return {"seed": seed, **connectivity.naive_vs_aligned(model, a, b, test, ts, rng=np.random.default_rng(seed))}
    return unit(out_dir, f"interp/seed{seed}/path", {**cfg, "interp_points": config.interp_points}, fn, inputs=inputs)


def soup(config, out_dir, seed, train, test, progress):
    model, pre_tx = make_model("mlp", train.num_classes, hidden=config.hidden), make_optimizer("sgd", 0.05, momentum=0.9)
    fresh = lambda tx, key=0: create_state(model, jax.random.key(key), (1, *train.images.shape[1:]), tx)  # noqa: E731
    perm, nval = np.random.default_rng(seed).permutation(len(train)), int(len(train) * config.val_fraction)
    val, sub = (data_lib.Split(train.images[i], train.labels[i], train.num_classes, f"{train.name}:{n}")
                for i, n in ((perm[:nval], "val"), (perm[nval:], "train")))
    cfg, pre = _pick(config, "hidden", "batch_size", "soup_pretrain_steps", "val_fraction", seed=seed), f"soups/seed{seed}/pretrain"
    pre_result = _fit(out_dir, pre, cfg, lambda: fresh(pre_tx, seed), sub, {"val": val}, steps=config.soup_pretrain_steps, seed=seed,
                      config=config, progress=progress)
    cfg, names, scores = {**cfg, "soup_finetune_steps": config.soup_finetune_steps}, [], []
    pre_params = jax.device_get(_restore(out_dir, pre, fresh(pre_tx)).params)  # host copy: fit donates its state
    for i, lr in enumerate(config.soup_lrs):  # the pre-trained weights, a fresh optimizer state
        tx, names = make_optimizer("sgd", lr, momentum=0.9), names + [f"soups/seed{seed}/finetune{i}"]
        scores.append(_fit(out_dir, names[i], {**cfg, "lr": lr}, lambda tx=tx: fresh(tx).replace(params=pre_params), sub,
                           {"val": val, "test": test}, steps=config.soup_finetune_steps, seed=100 * seed + i + 1, config=config,
                           progress=progress, inputs={pre: pre_result}))

    def fn(workdir):
        like = _restore(out_dir, pre, fresh(pre_tx))
        acc = lambda split: lambda p: evaluate(like.replace(params=p), split)["accuracy"]  # noqa: E731
        r = soups.compare([_restore(out_dir, n, like).params for n in names], acc(val), acc(test),
                          val_scores=[s["val"]["accuracy"] for s in scores], test_scores=[s["test"]["accuracy"] for s in scores])
        return {"seed": seed, "lrs": list(config.soup_lrs), "val_acc": r.pop("val"), "test_acc": r.pop("test"), **r}
    return unit(out_dir, f"soups/seed{seed}/soup", {**cfg, "soup_lrs": config.soup_lrs}, fn, inputs=dict(zip(names, scores)))


def two_process(out_dir):
    try:
        return unit(out_dir, "two_process", {"processes": 2, "seed": 0, "rounds": distributed.ROUNDS, "local_steps": distributed.LOCAL_STEPS},
                    distributed.check)
    except distributed.LaunchError as e:  # reported, not stored: a re-run tries again
        return {"ok": False, "error": str(e)}


def run(config: ml_collections.ConfigDict, out_dir: str, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    train, test = data_lib.load(config.dataset, "train"), data_lib.load(config.dataset, "test")
    div = [r for opt in averaging_report.OPTIMIZERS for s in config.seeds for r in divergence(config, out_dir, opt, s, train, test)]
    pairs = [aligned_pair(config, out_dir, s, train, test, progress) for s in config.seeds]
    soup_runs = [soup(config, out_dir, s, train, test, progress) for s in config.seeds]
    dist = two_process(out_dir) if config.two_process else {"ok": None, "skipped": True}

    table = averaging_report.tables(config, div, pairs, soup_runs, dist) + (
        f"\nSeeds {list(config.seeds)}; mean ± std; device {jax.devices()[0].device_kind}; wall {time.perf_counter() - t0:.0f} s.\n")
    p1, p2 = averaging_report.plots(out_dir, config, div, pairs)
    results = {"experiment": NAME, "config": to_dict(config), "divergence": div, "interpolation": pairs, "soups": soup_runs,
               "two_process": dist, "device_kind": jax.devices()[0].device_kind, "wall_time_s": time.perf_counter() - t0,
               "plots": [os.path.basename(p1), os.path.basename(p2)]}
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": [p1, p2]}


def main(argv=None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
