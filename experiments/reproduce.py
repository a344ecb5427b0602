"""Run every experiment at one preset (default ``tiny``) and write ``results/REPORT.md``.

    python experiments/reproduce.py                 # all experiments, tiny presets, CPU
    python experiments/reproduce.py --only train_baseline
    python experiments/reproduce.py --preset paper  # GPU/TPU: the papers' settings
    python experiments/reproduce.py --preset smoke  # seconds: checks the install end to end

An experiment is any ``experiments/<name>.py`` defining ``PRESETS``, ``run(config, out_dir,
progress)`` (returning ``{'results', 'table', 'plots'}``) and ``ORDER`` (its place in the
report); no list to maintain here.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import jax  # noqa: E402

from mergejax.config import choose_preset  # noqa: E402
from mergejax.run import enable_compilation_cache  # noqa: E402


def discover():
    mods = []
    for path in sorted(glob.glob(os.path.join(HERE, "*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name in ("reproduce", "__init__"):
            continue
        mod = importlib.import_module(name)
        if all(hasattr(mod, a) for a in ("PRESETS", "run", "ORDER")):
            mods.append(mod)
    return sorted(mods, key=lambda m: m.ORDER)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--only", action="append", default=[], help="run only this experiment (repeatable)")
    p.add_argument("--results", default="results", help="root directory for all outputs")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    mods = discover()
    if args.only:
        unknown = set(args.only) - {m.NAME for m in mods}
        if unknown:
            raise SystemExit(f"unknown experiment(s) {sorted(unknown)}; available: {', '.join(m.NAME for m in mods)}")
        mods = [m for m in mods if m.NAME in args.only]
    cache = enable_compilation_cache()  # $MERGEJAX_COMPILATION_CACHE, default ~/.cache/mergejax/xla; "off" disables
    warm = len(os.listdir(cache)) if cache else 0
    sections, timings = [], {}
    t_all = time.perf_counter()
    for mod in mods:
        out_dir = os.path.join(args.results, mod.NAME)
        print(f"== {mod.NAME} ({args.preset}) -> {out_dir}", flush=True)
        t0 = time.perf_counter()
        out = mod.run(choose_preset(mod.PRESETS, args.preset), out_dir, not args.quiet)
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
    with open(path, "w") as f:
        f.write("\n".join([header, *sections]))
    print(f"wrote {path} ({total:.0f} s)")


if __name__ == "__main__":
    main()
