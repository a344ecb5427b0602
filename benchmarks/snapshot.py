"""Snapshot-ensemble costs: training step time with vs without snapshot collection, and ensemble
evaluation time for M = 1..8 snapshots with ``vmap`` (one jitted call), ``lax.map`` (one jitted
call, members in sequence) and a Python loop of jitted per-member calls.

    python benchmarks/snapshot.py                       # small CNN on digits (CPU, ~1 min)
    python benchmarks/snapshot.py --model resnet20 --dataset cifar10 --steps 400

Training: the same host loop as ``fit`` (jitted ``train_step``, callbacks after each step) over
device-resident batches, with and without a ``SnapshotCollector`` taking M in-memory snapshots;
runs alternate and the median of ``--repeats`` is reported, plus the host time spent inside the
collector itself (robust to a busy machine, where the with/without ratio is noise). Orbax (on-disk) snapshots are timed
separately, per save. Writes ``benchmarks/results/snapshot.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import report
from mergejax.core import data as data_lib
from mergejax.core import optim as schedules
from mergejax.core import rundir
from mergejax.core.models import init_variables, make_model
from mergejax.core.optim import make_optimizer
from mergejax.core.train import STEP_STATIC, create_state, train_step
from mergejax.ensembles.snapshot import SnapshotCollector, ensemble_log_probs, ensemble_sums, stack_snapshots


def _loop(step_fn, state, batches, steps, callbacks):
    rng = jax.random.key(0)
    t0 = time.perf_counter()
    for step in range(steps):
        state, metrics = step_fn(state, batches[step % len(batches)], jax.random.fold_in(rng, step))
        for cb in callbacks:
            cb(step + 1, state)
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - t0, state


def bench_training(model, train, args):
    lr_fn = schedules.snapshot_cosine(0.1, args.steps, args.snapshots)
    tx = make_optimizer("sgd", lr_fn, momentum=0.9, nesterov=True, weight_decay=1e-4)
    state0 = create_state(model, jax.random.key(0), (1, *train.images.shape[1:]), tx, lr_fn=lr_fn)
    step_fn = jax.jit(train_step, donate_argnums=0, static_argnames=STEP_STATIC)
    it = data_lib.batches(train, args.batch_size, seed=0)
    batches = [jax.device_put(next(it)) for _ in range(16)]
    bounds = schedules.snapshot_boundaries(args.steps, args.snapshots)
    fresh = lambda: jax.tree.map(jnp.copy, state0)  # noqa: E731
    _loop(step_fn, fresh(), batches, 5, [])  # compile
    without, with_, in_callback = [], [], []
    for _ in range(args.repeats):
        without.append(_loop(step_fn, fresh(), batches, args.steps, [])[0])
        col, spent = SnapshotCollector(bounds), [0.0]

        def timed(step, state, col=col, spent=spent):  # host time inside the callback itself
            t0 = time.perf_counter()
            col(step, state)
            spent[0] += time.perf_counter() - t0

        with_.append(_loop(step_fn, fresh(), batches, args.steps, [timed])[0])
        in_callback.append(spent[0])
        assert col.steps == list(bounds), col.steps
    # orbax snapshots: time per save (amortised over a cycle in real training)
    with tempfile.TemporaryDirectory() as d:
        col = SnapshotCollector(range(1, 4), directory=d)
        saves = []
        for step in range(1, 4):
            t0 = time.perf_counter()
            col(step, state0)
            saves.append(time.perf_counter() - t0)
    w, s = statistics.median(without), statistics.median(with_)
    return {
        "steps": args.steps, "snapshots": args.snapshots, "repeats": args.repeats,
        "step_ms_without": 1e3 * w / args.steps, "step_ms_with": 1e3 * s / args.steps, "ratio": s / w,
        "overhead_pct": 100 * (s / w - 1), "runs_s_without": without, "runs_s_with": with_,
        "callback_ms_total": 1e3 * statistics.median(in_callback),
        "callback_pct_of_run": 100 * statistics.median(in_callback) / s,
        "orbax_save_ms": 1e3 * statistics.median(saves),
    }


def bench_eval(model, test, args):
    apply_fn = create_state(model, jax.random.key(0), (1, *test.images.shape[1:]), make_optimizer("sgd", 0.1)).apply_fn
    shape = (1, *test.images.shape[1:])
    snaps = [dict(zip(("params", "batch_stats"), init_variables(model, jax.random.key(i), shape))) for i in range(max(args.members))]
    batch = jax.device_put({"image": test.images[: args.eval_batch], "label": test.labels[: args.eval_batch],
                            "mask": np.ones(min(args.eval_batch, len(test)), np.float32)})
    sums = jax.jit(ensemble_sums, static_argnums=0, static_argnames="member_map")
    member = jax.jit(lambda p, s, x: jax.nn.log_softmax(apply_fn(p, s, x, train=False)[0], -1))

    @jax.jit
    def combine(log_probs, labels):
        ens = ensemble_log_probs(log_probs)
        nll = -jnp.take_along_axis(ens, labels[None, :, None], -1)[..., 0]
        return {"nll_sum": nll.sum(-1), "correct": (jnp.argmax(ens, -1) == labels).sum(-1)}

    def loop(snaps_m):
        return combine(jnp.stack([member(s["params"], s["batch_stats"], batch["image"]) for s in snaps_m]), batch["label"])

    def timeit(fn):
        jax.block_until_ready(fn())  # compile
        ts = []
        for _ in range(args.eval_repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            ts.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(ts)

    rows = []
    for m in args.members:
        st = stack_snapshots(snaps[:m])
        v = timeit(lambda: sums(apply_fn, st["params"], st["batch_stats"], batch, member_map="vmap"))
        lm = timeit(lambda: sums(apply_fn, st["params"], st["batch_stats"], batch, member_map="map"))
        lp = timeit(lambda: loop(snaps[:m]))
        b = loop(snaps[:m])
        for mm in ("vmap", "map"):  # same numbers all three ways
            a = sums(apply_fn, st["params"], st["batch_stats"], batch, member_map=mm)
            np.testing.assert_allclose(np.asarray(a["nll_sum"]), np.asarray(b["nll_sum"]), rtol=1e-4)
        rows.append({"M": m, "vmap_ms": v, "lax.map_ms": lm, "python_loop_ms": lp, "loop/vmap": lp / v})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--snapshots", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--members", type=int, nargs="+", default=list(range(1, 9)))
    p.add_argument("--eval-batch", type=int, default=360)
    p.add_argument("--eval-repeats", type=int, default=20)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    train = data_lib.load(args.dataset, "train")
    test = data_lib.load(args.dataset, "test")
    model = make_model(args.model, train.num_classes, width=args.width)
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({os.cpu_count()} host cores)"

    tr = bench_training(model, train, args)
    ev = bench_eval(model, test, args)
    head = (f"`{args.model}` width {args.width} on `{args.dataset}`, batch {args.batch_size}; device {device}.\n\n"
            f"Training, {tr['steps']} steps with {tr['snapshots']} in-memory snapshots vs none (median of {tr['repeats']}):\n\n")
    t1 = report.markdown_table([{"without (ms/step)": tr["step_ms_without"], "with (ms/step)": tr["step_ms_with"],
                                 "ratio": tr["ratio"], "overhead %": tr["overhead_pct"],
                                 "time in collector (% of run)": tr["callback_pct_of_run"],
                                 "orbax save (ms each)": tr["orbax_save_ms"]}])
    t2 = report.markdown_table(ev, floatfmt=".2f")
    text = head + t1 + f"\nEnsemble evaluation of {min(args.eval_batch, len(test))} test images (one batch), ms per call:\n\n" + t2
    print(text)
    os.makedirs(args.out, exist_ok=True)
    rundir.write_json(os.path.join(args.out, "snapshot.json"), {"args": vars(args), "device": device, "training": tr, "eval": ev})
    with open(os.path.join(args.out, "snapshot.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
