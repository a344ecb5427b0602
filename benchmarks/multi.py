"""N models one after another vs N models in one vmapped step (mergejax.core.multi).

    python benchmarks/multi.py [--model cnn --kw '{"width": 1.0}' --batch 128 --ns 1 4 8 --steps 20]

For each N: images/s of N solo steps (one compiled step, called N times per round) and of one
vmapped step over N models, measured in the same run after a compiling call, and the device
bytes XLA's memory analysis gives the vmapped step against N times one model's
(``mergejax.core.multi.step_memory_bytes``: arguments + outputs - donated + temporaries; "about
linear in N" is a ratio near 1); prints the ratios and writes
benchmarks/results/multi_<device>.md/.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from mergejax import report
from mergejax.core import data as data_lib
from mergejax.core.models import make_model
from mergejax.core.multi import multi_step, stack_states, step_memory_bytes, vmapped_step_memory_bytes
from mergejax.core.optim import make_optimizer
from mergejax.core.train import STEP_STATIC, create_state, train_step


def _time(fn, steps):
    fn()  # compile / warm up
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn")
    p.add_argument("--kw", default="{}", help="model kwargs as JSON")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--ns", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    train = data_lib.load(args.dataset, "train")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.kw).items()}
    model = make_model(args.model, train.num_classes, **kw)
    tx = make_optimizer("sgd", 0.05, momentum=0.9)
    shape = (1, *train.images.shape[1:])
    batch = next(data_lib.batches(train, args.batch, seed=0))
    solo_step = jax.jit(train_step, donate_argnums=0, static_argnames=STEP_STATIC)
    rows = []
    for n in args.ns:
        states = [create_state(model, jax.random.key(i), shape, tx) for i in range(n)]
        holder = {"states": states}

        def solo_round():
            new = []
            for i, s in enumerate(holder["states"]):
                s, m = solo_step(s, batch, jax.random.key(i))
                new.append(s)
            holder["states"] = new
            return m["loss"]

        t_solo = _time(solo_round, args.steps)
        step = multi_step()
        stacked = {"s": stack_states([create_state(model, jax.random.key(i), shape, tx) for i in range(n)])}
        batches = {k: np.stack([v] * n) for k, v in batch.items()}
        rngs = jax.random.split(jax.random.key(0), n)

        def vmapped_round():
            stacked["s"], m = step(stacked["s"], batches, rngs)
            return m["loss"]

        solo_bytes = step_memory_bytes(states[0], train.images.shape[1:], args.batch, train.images.dtype)
        vmap_bytes = vmapped_step_memory_bytes(stacked["s"], batches, rngs)
        t_vmap = _time(vmapped_round, args.steps)
        rows.append({"N": n, "solo images/s": n * args.batch / t_solo, "vmapped images/s": n * args.batch / t_vmap,
                     "vmapped / solo": t_solo / t_vmap, "vmapped MB": vmap_bytes / 2**20 if vmap_bytes else None,
                     "bytes / (N x solo)": vmap_bytes / (n * solo_bytes) if vmap_bytes and solo_bytes else None})
    device = jax.devices()[0].device_kind
    table = (f"`{args.model}` {args.kw} on `{args.dataset}`, batch {args.batch} per model, {args.steps} timed rounds, "
             f"device {device}.\n\n" + report.markdown_table(rows, floatfmt=".2f"))
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"multi_{device.replace(' ', '_').lower()}")
    with open(stem + ".md", "w") as f:
        f.write(table)
    report.write_json(stem + ".json", {"rows": rows, "args": vars(args), "device": device})


if __name__ == "__main__":
    main()
