"""Averaging gradients vs averaging weights (issue 3).

    python experiments/averaging.py                 # tiny: MLPs on digits, 3 seeds, a few minutes on CPU
    python experiments/averaging.py --set seeds=(0,) --set two_process=False

(a) local SGD (K local steps, then average weights) vs synchronous gradient averaging on the
    same data, K in (1, 2, 8, 32, 128), for SGD and momentum: parameter distance, test accuracy.
(b) two independently initialised and trained networks: naive vs weight-matched (Git Re-Basin)
    linear interpolation, test loss/accuracy along the path, loss barrier, PNG of the path.
(c) model soups of fine-tunes of one pre-trained network: best single vs uniform vs greedy.
(d) local SGD across 2 real processes (jax.distributed, CPU) vs the single-process result.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mergejax import averaging, local_sgd, rebasin, report, soups  # noqa: E402
from mergejax import data as data_lib  # noqa: E402
from mergejax.config import experiment_main, to_dict  # noqa: E402
from mergejax.models import init_variables, make_model  # noqa: E402
from mergejax.train import create_state, evaluate, train_step  # noqa: E402
from mergejax.units import take_units, unit_spec, variables_of  # noqa: E402

NAME = "averaging"
ORDER = 10
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@dataclasses.dataclass(frozen=True)
class AveragingConfig:
    dataset: str = "digits"
    seeds: tuple = (0, 1, 2)
    # (a) local SGD vs gradient averaging
    hidden: tuple = (64,)
    workers: int = 4
    worker_batch: int = 16
    total_steps: int = 128
    ks: tuple = (1, 2, 8, 32, 128)
    lr_sgd: float = 0.05
    lr_momentum: float = 0.01  # with momentum 0.9 the effective step is lr / (1 - 0.9) = 0.1
    # (b) two independent networks
    pair_hidden: tuple = (256,)
    pair_steps: int = 600
    pair_lr: float = 0.05
    batch_size: int = 64
    interp_points: int = 11
    # (c) soups
    soup_pretrain_steps: int = 300
    soup_finetune_steps: int = 150
    soup_lrs: tuple = (0.003, 0.01, 0.03, 0.1, 0.3)
    val_fraction: float = 0.2
    # (d)
    two_process: bool = True


def tiny() -> AveragingConfig:
    return AveragingConfig()


def paper() -> AveragingConfig:
    # Closest settings to the papers on CIFAR-10-scale hardware is out of reach on CPU; this
    # preset scales the same protocol to MNIST with wider MLPs (Ainsworth et al. 2022 use a
    # 3x512 MLP on MNIST for weight matching; Wortsman et al. 2022 soup 72 fine-tunes).
    return AveragingConfig(dataset="mnist", hidden=(512, 512, 512), pair_hidden=(512, 512, 512), workers=8,
                           worker_batch=64, total_steps=1024, ks=(1, 2, 8, 32, 128), pair_steps=6000,
                           soup_pretrain_steps=3000, soup_finetune_steps=1000, seeds=(0, 1, 2))


def smoke() -> AveragingConfig:
    """Seconds: checks the pipeline end to end (CI), not the method; no second process."""
    return AveragingConfig(seeds=(0,), hidden=(16,), workers=2, worker_batch=8, total_steps=8, ks=(1, 4), pair_hidden=(32,),
                           pair_steps=30, interp_points=3, soup_pretrain_steps=20, soup_finetune_steps=10,
                           soup_lrs=(0.01, 0.1), two_process=False)


PRESETS = {"tiny": tiny, "paper": paper, "smoke": smoke}


def _subset(split, idx, name):
    return data_lib.Split(split.images[idx], split.labels[idx], split.num_classes, f"{split.name}:{name}")


def _sci(values):
    m = report.mean_std(values)
    return f"{m['mean']:.2e} ± {m['std']:.1e}"


def _flat_dist(a, b):
    return float(jnp.sqrt(sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))))


class _Trainer:
    """One model/optimizer template so every seed reuses the compiled step. The step does not
    donate: the experiments keep earlier states (the start point, the synchronous run)."""

    def __init__(self, model, tx, shape):
        self.model, self.shape = model, shape
        self.template = create_state(model, jax.random.key(0), shape, tx)
        self.step = jax.jit(train_step)

    def fresh(self, seed, params=None):
        p, s = init_variables(self.model, jax.random.key(seed), self.shape) if params is None else (params, self.template.batch_stats)
        return self.template.replace(step=jnp.zeros((), jnp.int32), params=p, batch_stats=s, opt_state=self.template.tx.init(p))

    def train(self, state, split, steps, batch_size, seed):
        it = data_lib.batches(split, batch_size, seed=seed)
        for i in range(steps):
            state, _ = self.step(state, next(it), jax.random.key(i))
        return state

    def evaluate(self, state, split, params=None):
        return evaluate(state if params is None else state.replace(params=params), split, 500)


# --- (a) ---------------------------------------------------------------------------------


def divergence(cfg, train, test, shape, progress):
    rows = []
    model = make_model("mlp", train.num_classes, hidden=cfg.hidden)
    W, B, T = cfg.workers, cfg.worker_batch, cfg.total_steps
    for opt_name, tx in (("sgd", optax.sgd(cfg.lr_sgd)), ("momentum", optax.sgd(cfg.lr_momentum, momentum=0.9))):
        tr = _Trainer(model, tx, shape)
        rounds = {k: local_sgd.make_round(W, policy="keep") for k in cfg.ks}
        for seed in cfg.seeds:
            it = data_lib.batches(train, B, seed=seed)
            got = [next(it) for _ in range(T * W)]
            X = np.stack([g["image"] for g in got]).reshape(T, W, B, *shape[1:])
            Y = np.stack([g["label"] for g in got]).reshape(T, W, B)
            s0 = tr.fresh(seed)
            sync = s0
            for t in range(T):
                sync, _ = tr.step(sync, {"image": X[t].reshape(W * B, *shape[1:]), "label": Y[t].reshape(W * B)}, jax.random.key(t))
            sync_acc = tr.evaluate(sync, test)["accuracy"]
            moved = _flat_dist(sync.params, s0.params)
            for k in cfg.ks:
                st = local_sgd.init(s0, W)
                t0 = time.perf_counter()
                for r in range(T // k):
                    xs = X[r * k:(r + 1) * k].swapaxes(0, 1)  # (W, K, B, ...)
                    ys = Y[r * k:(r + 1) * k].swapaxes(0, 1)
                    st, _ = rounds[k](st, {"image": xs, "label": ys}, jax.random.key(r))
                dist = _flat_dist(st.params, sync.params)
                rows.append({"optimizer": opt_name, "K": k, "seed": seed, "param_dist": dist, "rel_dist": dist / moved,
                             "local_acc": tr.evaluate(s0, test, st.params)["accuracy"], "sync_acc": sync_acc,
                             "time_s": time.perf_counter() - t0})
            if progress:
                print(f"(a) {opt_name} seed {seed}: " + ", ".join(f"K={r['K']} d={r['param_dist']:.2e}" for r in rows[-len(cfg.ks):]))
    return rows


# --- (b) ---------------------------------------------------------------------------------


def barrier(losses, ts):
    return max(l - ((1 - t) * losses[0] + t * losses[-1]) for l, t in zip(losses, ts))


def aligned_pairs(cfg, train, test, shape, progress):
    model = make_model("mlp", train.num_classes, hidden=cfg.pair_hidden)
    tr = _Trainer(model, optax.sgd(cfg.pair_lr, momentum=0.9), shape)
    ts = list(np.linspace(0, 1, cfg.interp_points))
    runs = []
    for seed in cfg.seeds:
        a = tr.train(tr.fresh(1000 + 2 * seed), train, cfg.pair_steps, cfg.batch_size, seed=2 * seed)
        b = tr.train(tr.fresh(1001 + 2 * seed), train, cfg.pair_steps, cfg.batch_size, seed=2 * seed + 1)
        va, vb = variables_of(a.params, a.batch_stats), variables_of(b.params, b.batch_stats)
        spec = unit_spec(model, va)
        t0 = time.perf_counter()
        vb_al = take_units(vb, spec, rebasin.weight_matching(spec, va, vb, rng=np.random.default_rng(seed)))
        match_s = time.perf_counter() - t0
        run = {"seed": seed, "t": ts, "match_time_s": match_s}
        for name, other in (("naive", vb["params"]), ("aligned", vb_al["params"])):
            evals = [tr.evaluate(a, test, averaging.interpolate(a.params, other, t)) for t in ts]
            run[f"{name}_loss"] = [e["loss"] for e in evals]
            run[f"{name}_acc"] = [e["accuracy"] for e in evals]
            run[f"{name}_barrier"] = barrier(run[f"{name}_loss"], ts)
            run[f"{name}_mid_acc"] = evals[len(ts) // 2]["accuracy"]
        run["end_acc"] = [run["naive_acc"][0], run["naive_acc"][-1]]
        runs.append(run)
        if progress:
            print(f"(b) seed {seed}: barrier naive {run['naive_barrier']:.3f} aligned {run['aligned_barrier']:.3f}")
    return runs


# --- (c) ---------------------------------------------------------------------------------


def soup_runs(cfg, train, test, shape, progress):
    model = make_model("mlp", train.num_classes, hidden=cfg.hidden)
    runs = []
    for seed in cfg.seeds:
        perm = np.random.default_rng(seed).permutation(len(train))
        nval = int(len(train) * cfg.val_fraction)
        val, sub = _subset(train, perm[:nval], "val"), _subset(train, perm[nval:], "train")
        pre_tr = _Trainer(model, optax.sgd(0.05, momentum=0.9), shape)
        pre = pre_tr.train(pre_tr.fresh(seed), sub, cfg.soup_pretrain_steps, cfg.batch_size, seed=seed)
        fts = []
        for i, lr in enumerate(cfg.soup_lrs):
            tr = _Trainer(model, optax.sgd(lr, momentum=0.9), shape)
            fts.append(tr.train(tr.fresh(0, pre.params), sub, cfg.soup_finetune_steps, cfg.batch_size, seed=100 * seed + i + 1).params)
        score = lambda p: pre_tr.evaluate(pre, val, p)["accuracy"]  # noqa: E731
        val_scores = [score(p) for p in fts]
        test_acc = [pre_tr.evaluate(pre, test, p)["accuracy"] for p in fts]
        best = int(np.argmax(val_scores))
        uniform = soups.uniform_soup(fts)
        greedy, info = soups.greedy_soup(fts, score, scores=val_scores)
        runs.append({"seed": seed, "lrs": list(cfg.soup_lrs), "val_acc": val_scores, "test_acc": test_acc,
                     "best_single_test": test_acc[best], "uniform_test": pre_tr.evaluate(pre, test, uniform)["accuracy"],
                     "greedy_test": pre_tr.evaluate(pre, test, greedy)["accuracy"], "greedy_chosen": info["chosen"],
                     "uniform_val": score(uniform), "greedy_val": info["soup_score"], "best_single_val": val_scores[best]})
        if progress:
            r = runs[-1]
            print(f"(c) seed {seed}: best {r['best_single_test']:.4f} uniform {r['uniform_test']:.4f} greedy {r['greedy_test']:.4f}")
    return runs


# --- (d) ---------------------------------------------------------------------------------


def two_process(out_dir):
    """Run tests/_dp_worker.py's 2-process local SGD and compare with one process (vmap)."""
    worker = os.path.join(REPO, "tests", "_dp_worker.py")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, worker, "dist", os.path.join(out_dir, f"proc{i}.npz"), str(port), str(i)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        return {"ok": False, "error": "\n".join(e[-1500:] for e in errs)}
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from _dp_worker import dist_reference

    _, rounds, ref = dist_reference()
    a, b = (np.load(os.path.join(out_dir, f"proc{i}.npz")) for i in range(2))
    for i in range(2):
        os.remove(os.path.join(out_dir, f"proc{i}.npz"))
    return {"ok": True, "processes": 2, "rounds": len(rounds), "local_steps": 3,
            "max_gap_between_processes": max(float(np.abs(a[k] - b[k]).max()) for k in ref),
            "max_gap_vs_single_process": max(float(np.abs(a[k] - ref[k]).max()) for k in ref), "wall_time_s": wall}


# --- driver ------------------------------------------------------------------------------


def run(config: AveragingConfig, out_dir: str, progress: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    train, test = data_lib.load(config.dataset, "train"), data_lib.load(config.dataset, "test")
    shape = (1, *train.images.shape[1:])
    div = divergence(config, train, test, shape, progress)
    pairs = aligned_pairs(config, train, test, shape, progress)
    soup = soup_runs(config, train, test, shape, progress)
    dist = two_process(out_dir) if config.two_process else {"ok": None, "skipped": True}

    ms = report.fmt_mean_std
    table = "## (a) Local SGD (K local steps, then weight averaging) vs gradient averaging\n\n"
    table += f"{config.workers} workers x batch {config.worker_batch}, {config.total_steps} steps, MLP {config.hidden}; distance to the synchronous run (L2 over all params; rel = / distance the sync run moved).\n\n"
    rows_a = []
    for opt in ("sgd", "momentum"):
        for k in config.ks:
            rs = [r for r in div if r["optimizer"] == opt and r["K"] == k]
            rows_a.append({"optimizer": opt, "K": k, "param dist": _sci([r["param_dist"] for r in rs]),
                           "rel dist": ms([r["rel_dist"] for r in rs], digits=4),
                           "local SGD acc": ms([r["local_acc"] for r in rs], 100), "grad-avg acc": ms([r["sync_acc"] for r in rs], 100)})
    table += report.markdown_table(rows_a) + "\n"
    table += "## (b) Two independently trained networks: linear interpolation\n\n"
    rows_b = [{"method": m, "loss barrier": ms([r[f"{m}_barrier"] for r in pairs], digits=3),
               "midpoint acc": ms([r[f"{m}_mid_acc"] for r in pairs], 100),
               "endpoint acc": ms([x for r in pairs for x in r["end_acc"]], 100)} for m in ("naive", "aligned")]
    table += report.markdown_table(rows_b) + "\n"
    table += f"## (c) Soups of {len(config.soup_lrs)} fine-tunes (lrs {config.soup_lrs}) of one pre-trained MLP (test acc %)\n\n"
    rows_c = [{"model": m, "test acc": ms([r[f"{k}_test"] for r in soup], 100), "val acc": ms([r[f"{k}_val"] for r in soup], 100)}
              for m, k in (("best single (by val)", "best_single"), ("uniform soup", "uniform"), ("greedy soup", "greedy"))]
    table += report.markdown_table(rows_c) + "\n"
    table += "## (d) Local SGD across 2 processes (jax.distributed, CPU)\n\n"
    table += (f"max |params(proc 0) - params(proc 1)| = {dist.get('max_gap_between_processes')}, max |2-process - 1-process| = "
              f"{dist.get('max_gap_vs_single_process')}\n" if dist.get("ok") else f"not run / failed: {dist}\n")
    table += f"\nSeeds {list(config.seeds)}; mean ± std; device {jax.devices()[0].device_kind}; wall {time.perf_counter() - t0:.0f} s.\n"

    mean_path = lambda m, key: list(np.mean([r[f"{m}_{key}"] for r in pairs], 0))  # noqa: E731
    ts = pairs[0]["t"]
    p1 = report.plot_curves(os.path.join(out_dir, "interpolation.png"),
                            {"naive": (ts, mean_path("naive", "loss")), "aligned (weight matching)": (ts, mean_path("aligned", "loss"))},
                            xlabel="t  ((1-t) A + t B)", ylabel="test loss (nats)", title="Interpolating two independently trained MLPs")
    curves = {}
    for opt in ("sgd", "momentum"):
        curves[opt] = (list(config.ks), [float(np.mean([r["rel_dist"] for r in div if r["optimizer"] == opt and r["K"] == k])) for k in config.ks])
    p2 = report.plot_curves(os.path.join(out_dir, "divergence.png"), {k: ([np.log2(x) for x in v[0]], v[1]) for k, v in curves.items()},
                            xlabel="log2 K (local steps between averages)", ylabel="relative distance to gradient averaging", logy=False,
                            title="Local SGD vs gradient averaging")
    results = {"experiment": NAME, "config": to_dict(config), "divergence": div, "interpolation": pairs, "soups": soup,
               "two_process": dist, "device_kind": jax.devices()[0].device_kind, "wall_time_s": time.perf_counter() - t0,
               "plots": [os.path.basename(p1), os.path.basename(p2)]}
    report.write_outputs(out_dir, results, table)
    return {"results": results, "table": table, "plots": [p1, p2]}


def main(argv=None):
    experiment_main(argv, PRESETS, NAME, __doc__, run)


if __name__ == "__main__":
    main()
