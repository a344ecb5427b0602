"""The thin layer under ``experiments/*.py``: command line, run identity, resumable units.

An experiment script defines ``NAME``, ``ORDER`` (its place in the report), ``PRESETS``
(the preset names), ``get_config(preset) -> ml_collections.ConfigDict`` and ``run(config,
out_dir, progress)`` returning ``{'results', 'table', 'plots'}``. Its ``main`` is
``experiment_main(argv, module)``, which gives every experiment the same command line:
``--preset``, ``--set key=value`` (repeatable), ``--list-config``, ``--out``, ``--overwrite``.

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
import os
import sys
import time
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

from mergejax.core import rundir
from mergejax.config import format_config, override, to_dict


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
    return p


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
        enable_compilation_cache()
        out = run_experiment(module, config, out_dir, progress=progress, overwrite=args.overwrite, preset=preset)
        print(out["table"])
        print(f"wrote {out_dir}/results.json")
        return 0

    return run_entry_point(go, argv, debug="--debug" in argv)
