"""Cost of merging: concat and compress of ResNet pytrees, and the big student's gated train
step against a teacher's train step.

    python benchmarks/merging.py                         # CPU: a few minutes
    python benchmarks/merging.py --batch 128 --steps 20 --repeats 5   # GPU

concat and compress are one-off host calls on parameter pytrees: each is timed eagerly
(median of ``--repeats`` after one warm-up call). The train steps are jitted; compile time is
reported separately, steady-state time is the median over ``--repeats`` rounds that alternate
teacher and big-student steps (A/B/A/B) so drifting machine load hits both. XLA's FLOP count
of each compiled step gives the expected ratio (about 4x: every hidden layer has twice the
inputs and twice the outputs). Writes ``benchmarks/results/merging.{json,md}``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import report
from mergejax.core.models import init_variables, make_model
from mergejax.core.optim import make_optimizer
from mergejax.core.train import create_state, train_step
from mergejax.core.units import unit_spec, variables_of
from mergejax.merging import gates as G
from mergejax.merging.compress import compress
from mergejax.merging.concat import concat, concat_spec
from mergejax.merging.train import GateLoss, create_gate_state, gate_optimizer


def _init(model, seed, shape):
    return variables_of(*init_variables(model, jax.random.key(seed), shape))


def _timed(fn, repeats):
    jax.block_until_ready(fn())  # warm-up: per-shape op compilation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_tree_ops(name, repeats):
    model = make_model(name, 100)
    va, vb = _init(model, 0, (1, 32, 32, 3)), _init(model, 1, (1, 32, 32, 3))
    spec = unit_spec(model, va)
    big = concat(va, vb, spec)
    big_spec = concat_spec(spec)
    la = G.init_log_alpha(jax.random.key(2), big_spec, mean=0.0, std=1.0)
    n = sum(int(np.size(x)) for x in jax.tree.leaves(va["params"]))
    return {
        "model": name, "teacher_params": n, "leaves": len(jax.tree.leaves(va)),
        "concat_ms": 1e3 * _timed(lambda: concat(va, vb, spec), repeats),
        "compress_ms": 1e3 * _timed(lambda: compress(big, la, big_spec)[0], repeats),
    }


def bench_steps(name, batch, steps, repeats):
    k = 100
    model, big_model = make_model(name, k), make_model(name, k, width=2.0)
    tx = make_optimizer("sgd", 0.1, momentum=0.9, weight_decay=1e-4)
    teacher = create_state(model, jax.random.key(0), (1, 32, 32, 3), tx)
    big = _init(big_model, 1, (1, 32, 32, 3))
    spec = unit_spec(big_model, big)
    gstate = create_gate_state(big_model, spec, big, G.init_log_alpha(jax.random.key(3), spec), gate_optimizer())
    x = jax.random.normal(jax.random.key(4), (batch, 32, 32, 3))
    b = {"image": x, "label": jnp.zeros(batch, jnp.int32), "mask": jnp.ones(batch)}
    rng = jax.random.key(5)
    t_step = jax.jit(train_step)  # one step body for both; the gate loss is an argument
    g_step = jax.jit(functools.partial(train_step, loss_fn=GateLoss(G.lambda_schedule(0.05, 0.05, 10, 10))))
    out = {"model": name, "batch": batch}
    for label, step, state in (("teacher", t_step, teacher), ("big_gated", g_step, gstate)):
        t0 = time.perf_counter()
        compiled = step.lower(state, b, rng).compile()
        out[f"{label}_compile_s"] = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out[f"{label}_gflops"] = float(cost.get("flops", float("nan"))) / 1e9
        jax.block_until_ready(step(state, b, rng))
    times = {"teacher": [], "big_gated": []}
    for _ in range(repeats):
        for label, step, state in (("teacher", t_step, teacher), ("big_gated", g_step, gstate)):
            t0 = time.perf_counter()
            for i in range(steps):
                res = step(state, b, jax.random.fold_in(rng, i))  # not donated: same input each time
            jax.block_until_ready(res)
            times[label].append((time.perf_counter() - t0) / steps)
    out["teacher_ms"] = 1e3 * statistics.median(times["teacher"])
    out["big_gated_ms"] = 1e3 * statistics.median(times["big_gated"])
    out["time_ratio"] = out["big_gated_ms"] / out["teacher_ms"]
    out["flop_ratio"] = out["big_gated_gflops"] / out["teacher_gflops"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--step-model", default="resnet20")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({os.cpu_count()} host cores)"
    trees = [bench_tree_ops(m, args.repeats) for m in args.models]
    step = bench_steps(args.step_model, args.batch, args.steps, args.repeats)
    md = f"Device: {device}.\n\nconcat / compress of the parameter pytrees (eager, median of {args.repeats}):\n\n"
    md += report.markdown_table(trees, floatfmt=".1f")
    md += (f"\nTrain step, `{step['model']}` CIFAR 32x32, batch {step['batch']}: teacher vs big student "
           f"(width 2, per-example hard-concrete gates, L_half), median of {args.repeats} x {args.steps} steps, A/B alternating:\n\n")
    cols = ["teacher_ms", "big_gated_ms", "time_ratio", "teacher_gflops", "big_gated_gflops", "flop_ratio",
            "teacher_compile_s", "big_gated_compile_s"]
    md += report.markdown_table([{c: step[c] for c in cols}], floatfmt=".2f")
    report.write_json(os.path.join(args.out, "merging.json"), {"device": device, "tree_ops": trees, "step": step, "args": vars(args)})
    with open(os.path.join(args.out, "merging.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
