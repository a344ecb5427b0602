"""Throughput of the jitted train step, and the overhead of the ``fit`` host loop.

    python benchmarks/train_step.py                       # CPU: a few minutes
    python benchmarks/train_step.py --steps 50 --fit-steps 50 --repeats 5   # GPU/TPU

For each model: compile time of ``jax.jit(train_step, donate_argnums=0)`` (lower + compile),
steady-state steps/s and images/s of the compiled step, and the throughput of the full
``fit`` loop relative to a bare Python loop over the same compiled step on the same batches
(``fit / bare``; 1.0 = no overhead, the target is >= 0.95). fit and bare runs alternate
(A/B/A/B...) and each side's median over ``--repeats`` is used, so drifting machine load hits
both. Writes the table to ``benchmarks/results/train_step.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import report
from mergejax.core import data
from mergejax.core.loop import fit
from mergejax.core.models import make_model
from mergejax.core.optim import make_optimizer
from mergejax.core.train import STEP_STATIC, create_state, train_step


def _copy(state):
    """A fresh copy of the state's arrays (the step donates its input)."""
    return state.replace_arrays(jax.tree.map(jnp.array, state.arrays()))


def _bare_loop(state, split, step, num_steps, batch_size, seed):
    """The minimum a training loop does: next batch, step rng, step, repeat; one sync at the end."""
    rng = jax.random.key(seed)
    step_rng = jax.jit(jax.random.fold_in)  # as in fit: one dispatch instead of eager fold_in
    stream = data.batches(split, batch_size, seed=seed)
    for i in range(num_steps):
        state, _ = step(state, next(stream), step_rng(rng, i))
    return jax.block_until_ready(state)


def _fit(state, split, step, num_steps, batch_size, seed):
    state, _ = fit(state, split, num_steps=num_steps, batch_size=batch_size, seed=seed, step_fn=step, progress=False)
    return jax.block_until_ready(state)


def bench(name, split, batch_size, steps, fit_steps, repeats, seed=0, **model_kwargs):
    model = make_model(name, split.num_classes, **model_kwargs)
    tx = make_optimizer("sgd", 0.05, momentum=0.9, weight_decay=5e-4)
    state = create_state(model, jax.random.key(seed), (1, *split.images.shape[1:]), tx)
    step = jax.jit(train_step, donate_argnums=0, static_argnames=STEP_STATIC)
    step_rng = jax.jit(jax.random.fold_in)
    batch = jax.device_put(next(data.batches(split, batch_size, seed=seed)))
    rng = jax.random.key(seed)

    t0 = time.perf_counter()
    step.lower(state, batch, rng).compile()  # fills the cache that step() uses
    compile_s = time.perf_counter() - t0

    s = _copy(state)
    s, _ = step(s, batch, rng)  # warm-up (first dispatch)
    jax.block_until_ready(s)
    t0 = time.perf_counter()
    for i in range(steps):
        s, _ = step(s, batch, step_rng(rng, i))
    jax.block_until_ready(s)
    step_s = (time.perf_counter() - t0) / steps

    times = {"bare": [], "fit": []}
    cpu = {"bare": [], "fit": []}  # process CPU time (all threads): robust to other jobs on a shared machine
    for _ in range(repeats):
        for kind, loop in (("bare", _bare_loop), ("fit", _fit)):
            s = _copy(state)
            jax.block_until_ready(s)
            t0, c0 = time.perf_counter(), time.process_time()
            loop(s, split, step, fit_steps, batch_size, seed)
            times[kind].append(time.perf_counter() - t0)
            cpu[kind].append(time.process_time() - c0)
    bare, fitted = statistics.median(times["bare"]), statistics.median(times["fit"])
    return {
        "model": name,
        "input": "x".join(map(str, split.images.shape[1:])),
        "batch": batch_size,
        "compile_s": compile_s,
        "step_ms": 1e3 * step_s,
        "steps/s": 1.0 / step_s,
        "images/s": batch_size / step_s,
        "bare steps/s": fit_steps / bare,
        "fit steps/s": fit_steps / fitted,
        "fit/bare": bare / fitted,
        "fit/bare cpu": statistics.median(cpu["bare"]) / statistics.median(cpu["fit"]),
        "fit/step": (fit_steps / fitted) * step_s,
        "timed steps": f"{steps} + {repeats}x2x{fit_steps}",
    }


def random_split(n, shape, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, *shape)).astype(np.float32)
    return data.Split(images, rng.integers(0, num_classes, n).astype(np.int32), num_classes, "random")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,cnn,resnet20",
                   help="comma-separated: mlp (digits, one hidden layer of 64: a step of ~0.1 ms, the worst case for loop "
                        "overhead), cnn (digits 8x8x1), resnet20 (random 32x32x3)")
    p.add_argument("--cnn-batch", type=int, default=64)
    p.add_argument("--resnet-batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=0, help="timed steps of the compiled step (default: 200 cnn, 5 resnet20)")
    p.add_argument("--fit-steps", type=int, default=0, help="steps per fit/bare run (default: 200 cnn, 3 resnet20)")
    p.add_argument("--repeats", type=int, default=3, help="alternating fit/bare pairs (median)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_step.md"))
    args = p.parse_args(argv)

    rows = []
    for name in args.models.split(","):
        kwargs = {}
        if name == "mlp":
            split, bs, steps, fit_steps, kwargs = data.load("digits", "train"), args.cnn_batch, 1000, 1000, {"hidden": (64,)}
        elif name == "cnn":
            split, bs, steps, fit_steps = data.load("digits", "train"), args.cnn_batch, 200, 200
        elif name.startswith("resnet"):
            split, bs, steps, fit_steps = random_split(4 * args.resnet_batch, (32, 32, 3), 10), args.resnet_batch, 5, 5
        else:
            raise SystemExit(f"unknown benchmark model {name!r}; available: mlp, cnn, resnet20 (or another resnet depth)")
        row = bench(name, split, bs, args.steps or steps, args.fit_steps or fit_steps, args.repeats, **kwargs)
        print(f"{name}: {row['steps/s']:.2f} steps/s, fit/bare {row['fit/bare']:.3f}", flush=True)
        rows.append(row)

    dev = jax.devices()[0]
    header = (
        f"Device: {dev.device_kind} ({jax.device_count()} x {dev.platform}, {os.cpu_count()} host cores), "
        f"jax {jax.__version__}. fit/bare = bare-loop time / fit time over the same steps (median of "
        f"{args.repeats} alternating pairs; 1.0 = no loop overhead, target >= 0.95); 'cpu' = the same ratio of process CPU "
        f"time (less sensitive to other jobs); fit/step = fit steps/s over "
        f"the steps/s of the compiled step alone on one device-resident batch.\n\n"
    )
    table = header + report.markdown_table(rows, floatfmt=".3f")
    print("\n" + table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(table)
    return rows


if __name__ == "__main__":
    main()
