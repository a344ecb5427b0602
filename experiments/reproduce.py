"""Run every experiment at one preset (default ``tiny``) and write ``results/<preset>/REPORT.md``.

    python experiments/reproduce.py                 # all experiments, tiny presets, CPU
    python experiments/reproduce.py --only train_baseline
    python experiments/reproduce.py --preset paper  # GPU/TPU: the papers' settings
    python experiments/reproduce.py --preset smoke  # seconds: checks the install end to end
    python experiments/reproduce.py --preset paper --dry-run  # trains nothing: planned runs, FLOPs, GPU-hours

Outputs go to ``results/<preset>/`` (``--results`` to change). Each experiment resumes:
kill this command at any moment and run it again to finish without redoing finished units;
a directory holding another config is refused in one line (``--overwrite`` replaces it).

An experiment is any ``experiments/<name>.py`` defining ``NAME``, ``PRESETS``, ``get_config(preset)``, ``run(config,
out_dir, progress)`` (returning ``{'results', 'table', 'plots'}``) and ``ORDER`` (its place in
the report); no list to maintain here.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import os
import sys
import time

import jax

from mergejax.cli import quiet_libraries, run_entry_point
from mergejax.core.errors import UserError
from mergejax.experiment import add_dry_run_arguments, device_label, dry_run, get_config, run_experiment
from mergejax.run import enable_compilation_cache

HERE = os.path.dirname(os.path.abspath(__file__))


def discover():
    """The experiment modules of this folder, in report order."""
    mods = []
    for path in sorted(glob.glob(os.path.join(HERE, "*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name in ("reproduce", "__init__"):
            continue
        spec = importlib.util.spec_from_file_location(f"mergejax_experiments.{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        if all(hasattr(mod, a) for a in ("NAME", "PRESETS", "get_config", "run", "ORDER")):
            mods.append(mod)
    return sorted(mods, key=lambda m: m.ORDER)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_entry_point(_main, argv, debug="--debug" in argv)


def _main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--only", action="append", default=[], help="run only this experiment (repeatable)")
    p.add_argument("--results", default=None, help="root directory for all outputs (default results/<preset>)")
    p.add_argument("--overwrite", action="store_true", help="replace experiment directories that hold another config")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    add_dry_run_arguments(p)
    args = p.parse_args(argv)
    args.results = args.results or os.path.join("results", args.preset)
    quiet_libraries()
    mods = discover()
    if args.only:
        unknown = set(args.only) - {m.NAME for m in mods}
        if unknown:
            raise UserError(f"unknown experiment(s) {sorted(unknown)}; available: {', '.join(m.NAME for m in mods)}")
        mods = [m for m in mods if m.NAME in args.only]
    if args.dry_run:
        return _dry_run(mods, args)
    cache = enable_compilation_cache()  # $MERGEJAX_COMPILATION_CACHE, default ~/.cache/mergejax/xla; "off" disables
    warm = len(os.listdir(cache)) if cache else 0
    sections, timings = [], {}
    t_all = time.perf_counter()
    for mod in mods:
        out_dir = os.path.join(args.results, mod.NAME)
        print(f"== {mod.NAME} ({args.preset}) -> {out_dir}", flush=True)
        t0 = time.perf_counter()
        out = run_experiment(mod, get_config(mod, args.preset), out_dir, progress=not args.quiet,
                             overwrite=args.overwrite, preset=args.preset)
        took = time.perf_counter() - t0
        timings[mod.NAME] = took
        links = "\n".join(f"![{os.path.basename(p)}]({os.path.relpath(p, args.results)})" for p in out["plots"])
        sections.append(
            f"## {mod.NAME}\n\n{(mod.__doc__ or '').strip().splitlines()[0]}\n\n{out['table']}\n"
            f"Full results: [{mod.NAME}/results.json]({mod.NAME}/results.json) ({took:.0f} s)\n\n{links}\n"
        )
    total = time.perf_counter() - t_all
    cache_line = (f"persistent compilation cache `{cache}` ({'warm: ' + str(warm) + ' entries before the run' if warm else 'cold'})"
                  if cache else "no persistent compilation cache")
    header = (f"# mergejax report (preset `{args.preset}`)\n\n{len(mods)} experiment(s) in {total:.0f} s on "
              f"{jax.devices()[0].device_kind} ({jax.device_count()} device(s)); {cache_line}. "
              + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".\n")
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, "REPORT.md")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\n".join([header, *sections]))
    os.replace(tmp, path)
    print(f"wrote {path} ({total:.0f} s)")
    return 0


def _dry_run(mods, args) -> int:
    """Every experiment's planned runs and cost, and the sum; trains nothing, writes nothing."""
    flops_cache, totals, missing = {}, [], []
    for mod in mods:
        if not callable(getattr(mod, "plan", None)):
            print(f"== {mod.NAME}: no plan(config), not estimated", flush=True)
            missing.append(mod.NAME)
            continue
        print(f"== {mod.NAME} ({args.preset})", flush=True)
        totals.append(dry_run(mod, get_config(mod, args.preset), peak_tflops=args.device_peak_tflops,
                              utilisation=args.utilisation, cache=flops_cache, speed_table=args.speed_table))
    steps, flops, hours = (sum(t[k] for t in totals) for k in ("steps", "flops", "gpu_hours"))
    bf16 = sum(t.get("gpu_hours_bf16", 0.0) for t in totals)
    print(f"all experiments total: {sum(len(t['rows']) for t in totals)} run(s), {steps:,} steps, {flops:.3e} FLOPs, "
          f"{hours:.4g} GPU-hours at {device_label(args.device_peak_tflops)} x {args.utilisation:g} utilisation"
          + (f" ({bf16:.4g} with precision=bf16 on tensor cores)" if bf16 else "")
          + (f"; not estimated (no plan): {', '.join(missing)}" if missing else ""))
    print(f"dry run: nothing trained, nothing written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
