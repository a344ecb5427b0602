"""The thin layer under ``experiments/*.py``: command line, run identity, resumable units.

An experiment is two files, as in the Flax examples: ``experiments/configs/<name>.py`` (the
config file: ``PRESETS``, ``get_config(preset) -> ml_collections.ConfigDict`` and
``plan(config)``, the runs it will train) and ``experiments/<name>.py`` (the script: ``NAME``,
``ORDER`` (its place in the report), ``run(config, out_dir, progress)`` returning
``{'results', 'table', 'plots'}``, and the config file's names, loaded with
:func:`config_file`, so no ``sys.path`` edit is needed). Its ``main`` is
``experiment_main(argv, module)``, which gives every experiment the same command line:
``--preset``, ``--set key=value`` (repeatable), ``--list-config``, ``--out``, ``--overwrite``,
``--dry-run`` (with ``--device-peak-tflops``, ``--utilisation``).

``--dry-run`` trains nothing and writes nothing: it calls the module's ``plan(config)`` (one
row per training run, see :mod:`mergejax.cost`), prints each run's steps, batch and XLA FLOPs
per step, the totals and the GPU-hours they take at a stated peak and utilisation.

``run_experiment`` opens ``out_dir`` as a :class:`~mergejax.core.rundir.RunDir` whose manifest is
the resolved config: re-running the same command resumes, another config is refused in one
line (``--overwrite`` replaces). Inside, each seed x method x stage is a :func:`unit`: its
result is kept on disk and returned without recomputation on a re-run, and long units keep
checkpoints in their directory, so a killed experiment re-run with the same command ends
with the same ``results.json``. Tables and plots are drawn from unit results read back from
disk, never from memory alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

from mergejax import cost
from mergejax.core import rundir
from mergejax.core.errors import UserError
from mergejax.config import format_config, override, to_dict


def config_file(script: str) -> ModuleType:
    """The config file of the experiment script at ``script``: ``<its folder>/configs/<its
    stem>.py``, loaded by path (as ``ml_collections.config_flags`` loads config files) and
    kept in ``sys.modules`` as ``mergejax_configs.<stem>``, so loading it twice gives one module."""
    stem = os.path.splitext(os.path.basename(script))[0]
    path = os.path.join(os.path.dirname(os.path.abspath(script)), "configs", f"{stem}.py")
    key = f"mergejax_configs.{stem}"
    mod = sys.modules.get(key)
    if mod is not None and getattr(mod, "__file__", None) == path:
        return mod
    if not os.path.isfile(path):
        raise UserError(f"experiment {script} has no config file {path}")
    spec = importlib.util.spec_from_file_location(key, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[key]
        raise
    return mod


def unit(out_dir: str, name: str, config: Any, fn: Callable[[str], Mapping], *, inputs: Mapping | None = None) -> dict:
    """Run ``fn(workdir)`` once as the unit ``out_dir/units/<name>`` (see :func:`rundir.unit`).

    ``config`` is what the unit's result depends on (a dict, dataclass or JSON-able value);
    ``fn`` gets the unit's own directory, where it may keep checkpoints (pass a subdirectory
    of it as ``fit``'s ``workdir``) and must return a JSON-able dict.
    """
    path = os.path.join(out_dir, "units", name)
    cfg = config if isinstance(config, (dict, list, tuple, str, int, float, bool, type(None))) else to_dict(config)
    return rundir.unit(path, f"unit:{name}", cfg, fn, inputs=inputs)


def run_experiment(module: ModuleType, config: Any, out_dir: str, *, progress: bool = True, overwrite: bool = False,
                   preset: str | None = None) -> dict:
    """``module.run(config, out_dir, progress)`` inside ``out_dir`` opened as a run directory."""
    manifest = rundir.make_manifest(f"experiment:{module.NAME}", to_dict(config), {})
    with rundir.RunDir(out_dir, manifest, overwrite=overwrite) as rd:
        if rd.resumed and progress:
            print(f"resuming {out_dir} (finished units are read from disk)", flush=True)
        t0 = time.perf_counter()
        out = module.run(config, out_dir, progress)
        out["wall_time_s"] = time.perf_counter() - t0
        return out


def get_config(module: ModuleType, preset: str):
    """``module.get_config(preset)``, refusing an unknown preset in one line."""
    if preset not in module.PRESETS:
        raise ValueError(f"unknown preset {preset!r} for {module.NAME}; available: {', '.join(module.PRESETS)}")
    return module.get_config(preset)


def parser(name: str, presets: Sequence[str], description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help=f"one of: {', '.join(presets)} (default tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=0.05 (repeatable; see --list-config)")
    p.add_argument("--list-config", action="store_true",
                   help="print every config key of the preset (after --set) with its value and type, and exit")
    p.add_argument("--out", default=None, help=f"output directory (default results/<preset>/{name})")
    p.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    add_dry_run_arguments(p)
    return p


def add_dry_run_arguments(p: argparse.ArgumentParser) -> None:
    """``--dry-run``, ``--device-peak-tflops``, ``--utilisation`` (shared with reproduce.py)."""
    devices = "; ".join(f"{k} {v:g}" for k, v in cost.PEAK_TFLOPS.items())
    p.add_argument("--dry-run", action="store_true",
                   help="train nothing, write nothing: print the planned runs, XLA FLOPs per step and estimated GPU-hours")
    p.add_argument("--device-peak-tflops", type=float, default=cost.PEAK_TFLOPS[cost.DEFAULT_DEVICE],
                   help=f"peak TFLOP/s for --dry-run (default {cost.DEFAULT_DEVICE}, "
                        f"{cost.PEAK_TFLOPS[cost.DEFAULT_DEVICE]:g}; datasheet values: {devices})")
    p.add_argument("--utilisation", type=float, default=cost.DEFAULT_UTILISATION,
                   help=f"fraction of the peak a step sustains, for --dry-run (default {cost.DEFAULT_UTILISATION:g})")
    p.add_argument("--speed-table", default=None, metavar="JSON",
                   help="for --dry-run: benchmarks/speed.py's JSON (e.g. benchmarks/results/speed_<device>.json); runs of "
                        "a network, precision and batch it timed are estimated at that measured rate, on that device")


def device_label(peak_tflops: float) -> str:
    """``'67 TFLOP/s (H100 SXM fp32)'``: the peak and the table device it is, if any."""
    names = [k for k, v in cost.PEAK_TFLOPS.items() if v == peak_tflops]
    return f"{peak_tflops:g} TFLOP/s" + (f" ({names[0]})" if names else "")


def plan_rows(module: ModuleType, config: Any) -> list[dict]:
    """``module.plan(config)`` with every row checked; a module without ``plan`` is refused in one line."""
    if not callable(getattr(module, "plan", None)):
        raise UserError(f"experiment {module.NAME} has no plan(config), so --dry-run cannot estimate it")
    return [cost.check_row(r, f"{module.NAME}.plan") for r in module.plan(config)]


def dry_run(module: ModuleType, config: Any, *, peak_tflops: float, utilisation: float, cache: dict | None = None,
            echo: Callable[[str], None] = print, speed_table: str | None = None) -> dict:
    """Print ``module``'s planned runs and their cost; train nothing, write nothing.

    Each run is estimated at its own rate (:func:`mergejax.cost.row_rate`): a run of a network,
    precision and batch that ``speed_table`` (``benchmarks/speed.py``'s JSON) timed at its measured
    FLOP/s; otherwise ``utilisation`` x the peak of its precision (``precision=bf16`` runs at the
    device's bf16 tensor-core peak). Returns ``{'rows': [... with 'flops_per_step', 'total_flops',
    'hours', 'rate_source'], 'steps', 'flops', 'gpu_hours'}`` (+ ``'gpu_hours_bf16'``: every run
    at the bf16 peak, when the device has one). ``cache`` (a dict the caller keeps across
    experiments) holds one FLOP count per distinct (model, kwargs, precision, dataset, batch).
    """
    cost.gpu_hours(0.0, peak_tflops * 1e12, utilisation)  # refuse a bad peak or utilisation before tracing anything
    measured = cost.measured_rates(speed_table) if speed_table else None
    cache = {} if cache is None else cache
    rows = []
    for r in plan_rows(module, config):
        per_step = cost.row_flops(r, cache)
        rate, source = cost.row_rate(r, peak_tflops * 1e12, utilisation, measured)
        rows.append({**r, "flops_per_step": per_step, "total_flops": per_step * r["steps"],
                     "hours": per_step * r["steps"] / rate / 3600.0, "rate_source": source})
    steps, flops, hours = (sum(r[k] for r in rows) for k in ("steps", "total_flops", "hours"))
    echo(format_plan(module.NAME, rows))
    sources = {k: sum(r["rate_source"].startswith(k) for r in rows) for k in ("peak", "bf16 peak", "measured")}
    bf16 = cost.bf16_peak(peak_tflops)
    how = "; ".join(([f"{sources['bf16 peak']} precision=bf16 run(s) at {device_label(bf16)}"] if sources["bf16 peak"] else [])
                    + ([f"{sources['measured']} run(s) at the rate measured on {measured['device']} ({speed_table}): "
                        "their hours are on that device"] if sources["measured"] else []))
    echo(f"{module.NAME} total: {len(rows)} run(s), {steps:,} steps, {flops:.3e} FLOPs, "
         f"{hours:.4g} GPU-hours at {device_label(peak_tflops)} x {utilisation:g} utilisation" + (f" ({how})" if how else ""))
    out = {"rows": rows, "steps": steps, "flops": flops, "gpu_hours": hours}
    if bf16:
        out["gpu_hours_bf16"] = cost.gpu_hours(flops, bf16 * 1e12, utilisation)
        echo(f"{module.NAME} with precision=bf16: {out['gpu_hours_bf16']:.4g} GPU-hours at {device_label(bf16)} x "
             f"{utilisation:g} (the same FLOPs on tensor cores: a lower bound, small CIFAR convnets are memory-bound far "
             f"below that peak; vmapped seeds and several devices change the utilisation: time them with "
             f"benchmarks/speed.py and pass its JSON as --speed-table)")
    return out


def format_plan(name: str, rows: Sequence[Mapping]) -> str:
    """The dry-run table: one line per planned run."""
    head = ("run", "model", "dataset", "steps", "batch", "FLOPs/step", "total FLOPs", "hours", "rate")
    body = [(f"{name}/{r['name']}", _model_label(r), r["dataset"], f"{r['steps']:,}", str(r["batch_size"]),
             f"{r['flops_per_step']:.3e}", f"{r['total_flops']:.3e}", f"{r['hours']:.3g}", r["rate_source"]) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 3 or i == 8 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), *(line(b) for b in body)])


def _model_label(row: Mapping) -> str:
    kw = ",".join(f"{k}={v}" for k, v in sorted(row["model_kwargs"].items()))
    wf = f" x{row['width_factor']:g} wide" if row.get("width_factor", 1.0) != 1.0 else ""
    wf += f" {row['precision']}" if row.get("precision", "fp32") != "fp32" else ""
    return f"{row['model']}({kw}){wf}" if kw else f"{row['model']}{wf}"


def experiment_args(argv: Sequence[str] | None, module: ModuleType):
    """Parse an experiment's command line; returns ``(config, out_dir, progress, preset, args)``."""
    args = parser(module.NAME, module.PRESETS, module.__doc__ or "").parse_args(argv)
    config = override(get_config(module, args.preset), args.overrides)
    return config, args.out or os.path.join("results", args.preset, module.NAME), not args.quiet, args.preset, args


def experiment_main(argv: Sequence[str] | None, module: ModuleType) -> int:
    """The whole ``main()`` of an experiment script: parse, run, print the table. User
    errors are one line and exit status 2 (``--debug`` for the traceback)."""
    from mergejax.cli import quiet_libraries, run_entry_point
    from mergejax.run import enable_compilation_cache

    argv = sys.argv[1:] if argv is None else list(argv)

    def go(argv):
        config, out_dir, progress, preset, args = experiment_args(argv, module)
        if args.list_config:
            print(format_config(config))
            return 0
        quiet_libraries()
        if args.dry_run:  # before anything that creates out_dir or the compilation cache
            dry_run(module, config, peak_tflops=args.device_peak_tflops, utilisation=args.utilisation,
                    speed_table=args.speed_table)
            print(f"dry run: nothing trained, nothing written to {out_dir}")
            return 0
        enable_compilation_cache()
        out = run_experiment(module, config, out_dir, progress=progress, overwrite=args.overwrite, preset=preset)
        print(out["table"])
        print(f"wrote {out_dir}/results.json")
        return 0

    return run_entry_point(go, argv, debug="--debug" in argv)
