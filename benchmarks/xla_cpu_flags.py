"""A survey of XLA:CPU options on two training steps: ResNet-20 (random (128, 32, 32, 3) batches)
and the digits SmallCNN (batch 64, the real 8x8 digits).

    python benchmarks/xla_cpu_flags.py                   # ~10 min on 2 busy cores
    python benchmarks/xla_cpu_flags.py --quick           # 4 options, 1 round
    python benchmarks/xla_cpu_flags.py --options default "xnnpack off" --repeats 3
    python benchmarks/xla_cpu_flags.py --options default "ynn fusions" --append   # more rounds, same table

XLA reads ``XLA_FLAGS`` once, when jax starts its CPU backend, so every (option, round) runs
in a fresh subprocess of this script (``--worker``) with its own ``XLA_FLAGS``. Rounds
alternate the options (default, A, B, ..., default, A, B, ...) so drifting load from other
jobs hits all of them, and each option's fastest round counts (noise only ever slows a round
down). In one subprocess each model takes one compiling step, then ``--steps`` timed steps on
fixed batches from a fixed initialisation; the loss of the last step is the numerics check
(the same for every option up to float rounding; ``loss diff`` and OK at ``--rtol`` against the
default). Writes ``benchmarks/results/xla_cpu_flags.{md,json}``; ``--append`` adds this run's rounds
to the ones already in that JSON (the fastest over all of them counts).

Flags were found in jax 0.10.2's ``XLA_FLAGS=--help`` listing; ``--xla_cpu_use_thunk_runtime``
is accepted there but is a deprecated no-op (the thunk runtime is the only one), so it is
listed, not timed. "1 core" is no XLA flag: the worker pins itself to one core before jax
starts, which sizes XLA's intra-op thread pool to one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

#: name -> XLA_FLAGS value (defaults of jax 0.10.2 in the comments).
OPTIONS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",  # false: oneDNN thunks for matmul/conv fusions
    "onednn custom call": "--xla_cpu_experimental_onednn_custom_call=true",  # false
    "onednn + fusions": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "xnnpack off": "--xla_cpu_use_xnnpack=false",  # true
    "xnn fusions": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",  # ""
    "xnn graph fusion": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",  # DISABLED
    "ynn fusions": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",  # ""
    "eigen single-thread": "--xla_cpu_multi_thread_eigen=false",  # true
    "fast math": "--xla_cpu_enable_fast_math=true",  # false
    "fusion emitters off": "--xla_cpu_use_fusion_emitters=false",  # true
    "vector width 512": "--xla_cpu_prefer_vector_width=512",  # 256
    "opt preset fast runtime": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",  # DEFAULT
    "1 core": "",  # sched_setaffinity to one core in the worker
}
NOT_TIMED = {"--xla_cpu_use_thunk_runtime=false": "accepted, but a deprecated no-op in jax 0.10.2 (warns on use)"}
QUICK = ["default", "onednn", "xnnpack off", "eigen single-thread"]
MODELS = {"resnet20": 128, "cnn": 64}


def worker(spec: dict) -> dict:
    """Time ``spec['models']`` in this process (XLA_FLAGS already set by the parent):
    ``{model: {'first_s', 'step_s', 'cpu_s', 'loss'}}``."""
    if spec.get("cores"):
        os.sched_setaffinity(0, set(spec["cores"]))
    import jax
    import numpy as np

    from mergejax.core import data
    from mergejax.core.models import make_model
    from mergejax.core.optim import make_optimizer
    from mergejax.core.train import STEP_STATIC, create_state, train_step

    out = {}
    for name, batch in spec["models"].items():
        steps = spec["steps"][name]
        if name == "cnn":
            split = data.load("digits", "train")
        else:
            rng = np.random.default_rng(0)
            n = batch * 4
            split = data.Split(rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
                               rng.integers(0, 10, n).astype(np.int32), 10, "random")
        stream = data.batches(split, batch, seed=0)
        batches = [jax.device_put(next(stream)) for _ in range(steps + 1)]
        model = make_model(name, split.num_classes)
        tx = make_optimizer("sgd", 0.05, momentum=0.9, weight_decay=5e-4)
        state = create_state(model, jax.random.key(0), (1, *split.images.shape[1:]), tx)
        step = jax.jit(train_step, donate_argnums=0, static_argnames=STEP_STATIC)
        key = jax.random.key(0)
        t0 = time.perf_counter()
        state, m = step(state, batches[0], key)  # compile + one step
        jax.block_until_ready(state)
        first = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        for b in batches[1:]:
            state, m = step(state, b, key)
        jax.block_until_ready(state)
        out[name] = {"first_s": first, "step_s": (time.perf_counter() - t0) / steps,
                     "cpu_s": (time.process_time() - c0) / steps, "loss": float(m["loss"])}
    return out


def run_option(name: str, flags: str, models: dict, steps: dict, timeout: float) -> dict:
    """One fresh subprocess of :func:`worker` with ``XLA_FLAGS=flags``; ``{'error': ...}`` if it fails."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    spec = {"models": models, "steps": steps, "cores": [min(os.sched_getaffinity(0))] if name == "1 core" else None}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail[:200]}"}


def table_rows(results: dict, rtol: float) -> list[dict]:
    """Rows (one per option and model) from ``results[option] = [round dicts]`` (each round
    ``{model: {'step_s', 'cpu_s', 'first_s', 'loss'}}`` or ``{'error'}``): fastest round's ms/step,
    its ratio to the default's (``default / option``: > 1 is faster), the median round, CPU ms/step, the first call,
    and the loss against the default's."""
    def best(option, model, key):
        vals = [r[model][key] for r in results.get(option, []) if model in r]
        return min(vals) if vals else None

    rows = []
    for option, rounds in results.items():
        models = list(dict.fromkeys(m for r in rounds for m in r if m != "error")) or list(MODELS)
        for model in models:
            errors = [r["error"] for r in rounds if "error" in r]
            t, t0 = best(option, model, "step_s"), best("default", model, "step_s")
            loss = next((r[model]["loss"] for r in rounds if model in r), None)
            ref = next((r[model]["loss"] for r in results.get("default", []) if model in r), None)
            ok = loss is not None and ref is not None and abs(loss - ref) <= rtol * max(1.0, abs(ref))
            rows.append({
                "option": option,
                "XLA_FLAGS": OPTIONS.get(option, "") or ("(affinity: 1 core)" if option == "1 core" else "(none)"),
                "model": model,
                "rounds": sum(model in r for r in rounds),
                "ms/step": 1e3 * t if t is not None else "",
                "default/option": t0 / t if t and t0 else "",
                "median ms/step": 1e3 * statistics.median(r[model]["step_s"] for r in rounds if model in r)
                if t is not None else "",
                "CPU ms/step": 1e3 * best(option, model, "cpu_s") if t is not None else "",
                "first call s": best(option, model, "first_s") if t is not None else "",
                "loss": loss if loss is not None else "",
                "loss diff": abs(loss - ref) if loss is not None and ref is not None else "",
                "numerics": ("OK" if ok else "DIFF") if loss is not None and ref is not None else "",
                "error": errors[0] if errors and t is None else "",
            })
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--options", nargs="+", default=None, help=f"names from: {', '.join(OPTIONS)} (default: all)")
    p.add_argument("--models", default="resnet20,cnn")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds per option; the fastest counts")
    p.add_argument("--resnet-steps", type=int, default=3)
    p.add_argument("--cnn-steps", type=int, default=30)
    p.add_argument("--rtol", type=float, default=1e-3, help="numerics: |loss - default| <= rtol * max(1, |default|)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per subprocess")
    p.add_argument("--append", action="store_true", help="add to the rounds in --out/xla_cpu_flags.json")
    p.add_argument("--quick", action="store_true", help=f"options {', '.join(QUICK)}, 1 round")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return None
    names = args.options or (QUICK if args.quick else list(OPTIONS))
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise SystemExit(f"unknown option(s) {unknown}; known: {', '.join(OPTIONS)}")
    names = ["default"] + [n for n in names if n != "default"]
    repeats = 1 if args.quick else args.repeats
    models = {m: MODELS[m] for m in args.models.split(",")}
    steps = {"resnet20": args.resnet_steps, "cnn": args.cnn_steps}
    results = {n: [] for n in names}
    json_path = os.path.join(args.out, "xla_cpu_flags.json")
    if args.append and os.path.exists(json_path):
        with open(json_path) as f:
            previous = json.load(f)["results"]
        results = {n: previous.get(n, []) for n in OPTIONS if n in names or n in previous}  # table in OPTIONS order
    t_start = time.perf_counter()
    for r in range(repeats):  # A/B/C/A/B/C
        for name in names:
            res = run_option(name, OPTIONS[name], models, {m: steps[m] for m in models}, args.timeout)
            results[name].append(res)
            desc = res.get("error") or ", ".join(f"{m} {1e3 * v['step_s']:.1f} ms/step loss {v['loss']:.5f}"
                                                  for m, v in res.items())
            print(f"[round {r + 1}/{repeats}, {time.perf_counter() - t_start:.0f} s] {name}: {desc}", flush=True)

    rows = table_rows(results, args.rtol)
    import jax  # only for the versions in the header (this process runs no computation)

    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    header = (
        f"XLA:CPU options, jax {jax.__version__}, {cpu} ({os.cpu_count()} cores). One fresh process per option and "
        f"round, rounds alternating A/B/C/A/B/C (rounds: per option, over all runs appended here); ms/step: the fastest round's mean over its timed "
        f"steps (ResNet-20: {args.resnet_steps} steps of batch 128 on random 32x32x3; cnn: {args.cnn_steps} steps of "
        f"batch 64 on digits), after one compiling step (first call s). default/option > 1: the option is faster. "
        f"median: the median round (the fastest can come from a quiet moment that other options did not get). CPU ms/step: process CPU time of all threads (fastest round). **Timings are noisy**: the machine is shared with other "
        f"jobs (other agents' tests and benchmarks on the same 2 cores), so differences under ~10-15% are not "
        f"resolved; the minimum of the repeats is the least disturbed run. Numerics: the loss of the last step vs "
        f"the default's (same init, same batches), OK at rtol {args.rtol}.\n\n"
    )
    note = "".join(f"\nNot timed: `{flag}`: {why}.\n" for flag, why in NOT_TIMED.items())
    table = header + report_table(rows) + note
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "xla_cpu_flags.md"), "w") as f:
        f.write(table)
    from mergejax.core.rundir import write_json

    write_json(json_path,
               {"jax": jax.__version__, "cpu": cpu, "cores": os.cpu_count(), "repeats": repeats, "options": OPTIONS,
                "not_timed": NOT_TIMED, "results": results, "rows": rows, "args": vars(args)})
    return rows


def report_table(rows: list[dict]) -> str:
    from mergejax import report

    return report.markdown_table(rows, floatfmt=".4g")


if __name__ == "__main__":
    main()
