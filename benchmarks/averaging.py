"""Averaging benchmarks: the ``mergejax average`` CLI over N checkpoints, and the data-parallel step.

    python benchmarks/averaging.py                     # CPU: a few minutes
    python benchmarks/averaging.py --ns 2,8 --skip-dp

1. ``mergejax average`` over N = 2, 8, 32 checkpoints of ResNet-56 size (CIFAR-10, ~0.86M
   params): wall time and peak RSS of a fresh process, against a baseline process that only
   imports and loads ONE checkpoint, and against loading all N first then averaging
   (``averaging.average``). Streaming memory must stay flat in N.
2. The data-parallel step (``parallel.make_dp_step``, shard_map over D simulated CPU devices)
   vs the single-device ``train_step`` on the same global batch (each in a fresh process
   with ``--xla_force_host_platform_device_count``). On a GPU machine the dp step runs over
   its real devices.

Writes ``benchmarks/results/averaging.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap


REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

_MEM = """
import json, sys, time
mode, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
t0 = time.perf_counter()
if mode == "cli":
    from mergejax import cli
    cli.main(["average", *paths, "--out", out])
elif mode == "naive":
    from mergejax.averaging import weights as averaging
    from mergejax.core import checkpoint
    from mergejax.cli.average import load_variables
    trees = [load_variables(p) for p in paths]
    checkpoint.save(out, averaging.average(trees))
else:  # baseline: import + load one checkpoint
    from mergejax.cli.average import load_variables
    load_variables(paths[0])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the (large) parent.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"wall_s": time.perf_counter() - t0, "peak_rss_mb": int(hwm) / 1024}}))
"""

_DP = """
import json, sys, time
import jax, numpy as np, optax
from mergejax.averaging import parallel
from mergejax.core.data import shard_batch
from mergejax.core.models import make_model
from mergejax.core.train import create_state, train_step
model_name, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
shape = (8, 8, 1) if model_name == "cnn" else (32, 32, 3)
model = make_model(model_name, 10)
state = create_state(model, jax.random.key(0), (1, *shape), optax.sgd(0.05, momentum=0.9))
r = np.random.default_rng(0)
b = {{"image": r.normal(size=(batch, *shape)).astype(np.float32), "label": r.integers(0, 10, batch).astype(np.int32)}}
rng = jax.random.key(0)
res = {{"devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind}}
mesh = parallel.data_mesh()
for name, step, bb in (("single", jax.jit(train_step), jax.device_put(b, jax.devices()[0])),
                       ("dp", parallel.make_dp_step(mesh), shard_batch(b, mesh))):
    t0 = time.perf_counter(); s, _ = step(state, bb, rng); jax.block_until_ready(s); res[name + "_first_call_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        s, _ = step(s, bb, rng)
    jax.block_until_ready(s)
    res[name + "_step_ms"] = 1e3 * (time.perf_counter() - t0) / steps
print(json.dumps(res))
"""


def _run(code, args, env=None):
    full = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)} | (env or {})
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, env=full, cwd=REPO)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def make_checkpoints(root, n, model="resnet56"):
    import jax

    from mergejax.core import checkpoint
    from mergejax.core.models import count_params, init_variables, make_model

    net = make_model(model, 10)
    p, s = init_variables(net, jax.random.key(0), (1, 32, 32, 3))
    paths = []
    for i in range(n):
        noise = jax.tree.map(lambda x: x + 0.01 * i, {"params": p, "batch_stats": s})
        paths.append(checkpoint.save(os.path.join(root, f"ckpt{i}"), {**noise, "step": jax.numpy.array(i)}))
    return paths, count_params(p)


def main(argv=None):
    from mergejax import report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="2,8,32")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-dp", action="store_true")
    ap.add_argument("--dp-devices", type=int, default=8)
    ap.add_argument("--dp-models", default="cnn:256,resnet20:64")
    ap.add_argument("--dp-steps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "averaging.md"))
    args = ap.parse_args(argv)
    ns = [int(x) for x in args.ns.split(",")]
    mem_rows, dp_rows = [], []
    with tempfile.TemporaryDirectory() as root:
        paths, nparams = make_checkpoints(root, max(ns))
        mb = nparams * 4 / 2**20
        base = _run(_MEM.format(repo=REPO), ["base", "-", paths[0]])
        mem_rows.append({"method": "baseline (import + load 1)", "N": 1, "wall_s": base["wall_s"], "peak_rss_mb": base["peak_rss_mb"],
                         "over_baseline_mb": 0.0})
        for n in ns:
            for method in ("cli",) + (() if args.skip_naive else ("naive",)):
                r = _run(_MEM.format(repo=REPO), [method, os.path.join(root, f"out_{method}_{n}"), *paths[:n]])
                mem_rows.append({"method": "mergejax average (streaming)" if method == "cli" else "load all, then average",
                                 "N": n, "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
                                 "over_baseline_mb": r["peak_rss_mb"] - base["peak_rss_mb"]})
                print(mem_rows[-1], flush=True)
    if not args.skip_dp:
        import jax

        on_cpu = jax.devices()[0].platform == "cpu"
        env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={args.dp_devices}"} if on_cpu else {}
        for item in args.dp_models.split(","):
            name, batch = item.split(":")
            r = _run(_DP.format(repo=REPO), [name, batch, str(args.dp_steps)], env)
            dp_rows.append({"model": name, "global batch": int(batch), **r})
            print(dp_rows[-1], flush=True)
    import jax

    header = (f"Host: {os.cpu_count()} cores (shared with other jobs), jax {jax.__version__}. ResNet-56 checkpoint: "
              f"{nparams} params ({mb:.1f} MiB float32 + BN stats). Peak RSS of a fresh process (includes Python + JAX, "
              f"see the baseline row).\n\n")
    table = header + report.markdown_table(mem_rows, floatfmt=".2f")
    if dp_rows:
        table += ("\nData-parallel step (shard_map over the devices) vs single-device train_step, same global batch; "
                  f"mean over the timed steps ({args.dp_steps}) after a first (compiling) call.\n\n" + report.markdown_table(dp_rows, floatfmt=".2f"))
    print("\n" + table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(table)
    report.write_json(args.out.replace(".md", ".json"), {"memory": mem_rows, "dp": dp_rows, "params": nparams})


if __name__ == "__main__":
    main()
