"""Averaging gradients vs averaging weights (issue 3). ``python experiments/averaging.py [--preset smoke] [--set seeds=(0,)]``

(a) local SGD (K local steps, then average weights) vs synchronous gradient averaging on the same batches, for SGD
    and momentum; (b) naive vs weight-matched (Git Re-Basin) interpolation of two independently trained networks;
(c) best single vs uniform vs greedy soup of fine-tunes; (d) local SGD across 2 real processes (jax.distributed).
Units (re-runs read finished ones from disk): ``divergence/<opt>/seed<s>``, ``interp/seed<s>/net0|net1|path``,
``soups/seed<s>/pretrain|finetune<i>|soup``, ``two_process``; (b), (c) ``fit`` in ``<unit>/fit`` (checkpointed).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import ml_collections
import numpy as np

from mergejax import report
from mergejax.averaging import connectivity, distributed, local_sgd, soups
from mergejax.config import to_dict
from mergejax.core import checkpoint, data as data_lib
from mergejax.core.loop import evaluate, fit
from mergejax.core.models import make_model
from mergejax.core.optim import make_optimizer
from mergejax.core.train import create_state
from mergejax.experiment import experiment_main, unit

NAME, ORDER, PRESETS = "averaging", 10, ("tiny", "smoke", "paper")


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        dataset="digits", seeds=(0, 1, 2),
        # (a) local SGD vs gradient averaging; with momentum 0.9 the effective step is lr / (1 - 0.9) = 0.1
        hidden=(64,), workers=4, worker_batch=16, total_steps=128, ks=(1, 2, 8, 32, 128), lr_sgd=0.05, lr_momentum=0.01,
        # (b) two independent networks; (c) soups of fine-tunes with these learning rates
        pair_hidden=(256,), pair_steps=600, pair_lr=0.05, batch_size=64, interp_points=11,
        soup_pretrain_steps=300, soup_finetune_steps=150, soup_lrs=(0.003, 0.01, 0.03, 0.1, 0.3), val_fraction=0.2,
        two_process=True, checkpoint_every=300))  # (d); steps between fit checkpoints in (b), (c)
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


def _pick(config, *keys, **extra) -> dict:
    return {"dataset": config.dataset, **{k: config[k] for k in keys}, **extra}


def _fit(out_dir, name, cfg, start, split, evals, *, steps, seed, config, progress, inputs=None) -> dict:
    """Unit ``name``: ``fit`` ``start()`` in ``<unit>/fit`` (checkpointed, resumed); returns ``{eval split: metrics}``."""
    def fn(workdir):
        state, _ = fit(start(), split, num_steps=steps, batch_size=config.batch_size, seed=seed, progress=progress,
                       manifest=cfg, workdir=os.path.join(workdir, "fit"), checkpoint_every=config.checkpoint_every)
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
    nets = [_fit(out_dir, names[j], {**cfg, "net": j}, lambda j=j: fresh(1000 + 2 * seed + j), train, {"test": test},
                 steps=config.pair_steps, seed=2 * seed + j, config=config, progress=progress) for j in (0, 1)]

    def fn(workdir):
        a, b = (_restore(out_dir, n, fresh(0)) for n in names)
        ts = np.linspace(0, 1, config.interp_points)
        return {"seed": seed, **connectivity.naive_vs_aligned(model, a, b, test, ts, rng=np.random.default_rng(seed))}
    return unit(out_dir, f"interp/seed{seed}/path", {**cfg, "interp_points": config.interp_points}, fn, inputs=dict(zip(names, nets)))


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
    opts = ("sgd", "momentum")  # (a) SGD and SGD with momentum 0.9
    div = [r for opt in opts for s in config.seeds for r in divergence(config, out_dir, opt, s, train, test)]
    pairs = [aligned_pair(config, out_dir, s, train, test, progress) for s in config.seeds]
    soup_runs = [soup(config, out_dir, s, train, test, progress) for s in config.seeds]
    dist = two_process(out_dir) if config.two_process else {"ok": None, "skipped": True}

    ms, sel = report.fmt_mean_std, lambda o, k, key: [r[key] for r in div if r["optimizer"] == o and r["K"] == k]  # noqa: E731
    rows_a = [{"optimizer": o, "K": k, "param dist": "{mean:.2e} ± {std:.1e}".format(**report.mean_std(sel(o, k, "param_dist"))),
               "rel dist": ms(sel(o, k, "rel_dist"), digits=4), "local SGD acc": ms(sel(o, k, "local_acc"), 100),
               "grad-avg acc": ms(sel(o, k, "sync_acc"), 100)} for o in opts for k in config.ks]
    rows_b = [{"method": m, "loss barrier": ms([r[f"{m}_barrier"] for r in pairs], digits=3), "midpoint acc":
               ms([r[f"{m}_mid_acc"] for r in pairs], 100), "endpoint acc": ms([x for r in pairs for x in r["end_acc"]], 100)}
              for m in ("naive", "aligned")]
    rows_c = [{"model": m, "test acc": ms([r[f"{k}_test"] for r in soup_runs], 100), "val acc": ms([r[f"{k}_val"] for r in soup_runs], 100)}
              for m, k in (("best single (by val)", "best_single"), ("uniform soup", "uniform"), ("greedy soup", "greedy"))]
    table = (f"## (a) Local SGD (K local steps, then weight averaging) vs gradient averaging\n\n{config.workers} workers x batch "
             f"{config.worker_batch}, {config.total_steps} steps, MLP {config.hidden}; distance to the synchronous run on the same batches "
             f"(L2 over all params; rel = / distance the sync run moved).\n\n{report.markdown_table(rows_a)}\n"
             f"## (b) Two independently trained networks: linear interpolation\n\n{report.markdown_table(rows_b)}\n"
             f"## (c) Soups of {len(config.soup_lrs)} fine-tunes (lrs {config.soup_lrs}) of one pre-trained MLP (test acc %)\n\n"
             f"{report.markdown_table(rows_c)}\n## (d) Local SGD across 2 processes (jax.distributed, CPU)\n\n")
    table += (f"max |params(proc 0) - params(proc 1)| = {dist['max_gap_between_processes']}, max |2-process - 1-process| = "
              f"{dist['max_gap_vs_single_process']}\n" if dist.get("ok") else f"not run / failed: {dist}\n")
    table += f"\nSeeds {list(config.seeds)}; mean ± std; device {jax.devices()[0].device_kind}; wall {time.perf_counter() - t0:.0f} s.\n"

    ts, mean_loss = pairs[0]["t"], lambda m: list(np.mean([r[f"{m}_loss"] for r in pairs], 0))  # noqa: E731
    p1 = report.plot_curves(os.path.join(out_dir, "interpolation.png"),
                            {"naive": (ts, mean_loss("naive")), "aligned (weight matching)": (ts, mean_loss("aligned"))},
                            xlabel="t  ((1-t) A + t B)", ylabel="test loss (nats)", title="Interpolating two independently trained MLPs")
    p2 = report.plot_curves(os.path.join(out_dir, "divergence.png"),
                            {o: (list(np.log2(config.ks)), [float(np.mean(sel(o, k, "rel_dist"))) for k in config.ks]) for o in opts},
                            xlabel="log2 K (local steps between averages)", ylabel="relative distance to gradient averaging",
                            title="Local SGD vs gradient averaging")
    results = {"experiment": NAME, "config": to_dict(config), "divergence": div, "interpolation": pairs, "soups": soup_runs,
               "two_process": dist, "device_kind": jax.devices()[0].device_kind, "wall_time_s": time.perf_counter() - t0,
               "plots": [os.path.basename(p1), os.path.basename(p2)]}
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": [p1, p2]}


def main(argv=None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
