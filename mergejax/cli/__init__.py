"""``mergejax COMMAND [args]``: the command-line tools.

Each command is ``name -> "module:function"``, imported only when used (``mergejax --help``
imports no jax); the function takes the remaining argv. User errors (unknown key, dataset or
model, a mismatch, an existing or locked ``--out``, a missing path) print one line and exit
with status 2; ``--debug`` anywhere on the line shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("mergejax.cli:train", "train one model from the default train config with --set overrides"),
    "average": ("mergejax.cli.average:main", "average checkpoints (streaming; --weights, --align, --recompute-bn)"),
    "merge": ("mergejax.cli.merge:main", "merge two trained networks (concat, gates, compress, fine-tune)"),
    "prepare": ("mergejax.cli.prepare:main", "download and convert a dataset ahead of time"),
}

USAGE_ERRORS = (KeyError, ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError)


def train(argv):
    """``mergejax train --set dataset=digits --set model=cnn --out DIR``: train, checkpoint, evaluate.
    ``--set 'seeds=(0,1,2,3)'`` trains one model per seed, ``models_per_program`` of them in one
    vmapped program (0 = auto), each group in ``DIR/seeds_<a>_<b>/``, with DIR/summary.json
    listing each seed's test accuracy."""
    import argparse
    import copy
    import json
    import os

    from mergejax.config import format_config, override, replace, to_dict, train_config

    p = argparse.ArgumentParser(prog="mergejax train", description=train.__doc__)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="train config key, e.g. --set model=resnet20 --set dataset=cifar10 (see --list-config)")
    p.add_argument("--list-config", action="store_true", help="print every key with its default and type, and exit")
    p.add_argument("--out", help="work directory: checkpoints/, metrics.jsonl, summary.json")
    p.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    config = train_config()
    config.seeds = ()  # train these seeds (distinct ints); () = just `seed`
    # seeds per vmapped program; 0 = auto: 1 on CPU (measured slower vmapped), on GPU/TPU as many
    # as fit in free device memory (mergejax.core.multi.models_per_program)
    config.models_per_program = 0
    config = override(config, args.overrides)
    if args.list_config:
        print(format_config(config))
        return 0
    if args.out is None:
        p.error("the following arguments are required: --out")
    from mergejax.core import rundir
    from mergejax.run import train_and_evaluate

    seeds, requested = tuple(config.seeds), config.models_per_program
    if requested < 0:
        raise ValueError(f"models_per_program must be >= 0 (0 = auto), got {requested}")
    base = copy.deepcopy(config)
    del base["seeds"], base["models_per_program"]  # one run's config, as train_and_evaluate records it
    keys = ("test_accuracy", "test_loss", "steps", "wall_time_s")
    if len(seeds) <= 1:
        base = replace(base, seed=seeds[0]) if seeds else base
        _, summary = train_and_evaluate(base, args.out, progress=not args.quiet, overwrite=args.overwrite)
        summary = {k: v for k, v in summary.items() if k != "history"} | {"config": to_dict(base)}
        rundir.write_json(os.path.join(args.out, "summary.json"), summary)
        print(json.dumps({k: summary[k] for k in keys}))
        return 0

    import numpy as np

    from mergejax.run import seed_groups, train_and_evaluate_many

    shared = {k: v for k, v in to_dict(base).items() if k != "seed"}
    manifest = rundir.make_manifest("train_seeds", {"train_config": shared, "seeds": list(seeds),
                                                    "models_per_program": requested})
    with rundir.RunDir(args.out, manifest, overwrite=args.overwrite) as rd:
        # an auto choice is kept on resume, whatever memory is free now (plan.json: {"groups": ...})
        groups = seed_groups(base, seeds, requested, pin=(os.path.join(rd.path, "plan.json"), "groups"))
        rows, wall = [], 0.0
        for group in groups:
            sub = os.path.join(rd.path, "seeds_" + "_".join(map(str, group)))
            if len(group) == 1:  # a plain solo run (data-parallel over config.devices as usual)
                _, summary = train_and_evaluate(replace(base, seed=group[0]), sub, progress=not args.quiet)
                summaries = [{"seed": group[0], **summary}]
            else:
                _, summaries = train_and_evaluate_many(base, group, sub, progress=not args.quiet)
            wall += summaries[0]["wall_time_s"]  # one program per group: its time is shared
            rows += [{"seed": s["seed"], **{k: s[k] for k in keys}, "workdir": os.path.relpath(sub, rd.path)}
                     for s in summaries]
        acc = [r["test_accuracy"] for r in rows]
        summary = {"seeds": list(seeds), "models_per_program": len(groups[0]), "groups": groups,
                   "test_accuracy_mean": float(np.mean(acc)), "test_accuracy_std": float(np.std(acc, ddof=1)),
                   "steps": rows[0]["steps"], "wall_time_s": wall,
                   "per_seed": rows, "config": to_dict(config)}
        rundir.write_json(os.path.join(rd.path, "summary.json"), summary)
    print(json.dumps({"seeds": list(seeds), "test_accuracy": acc, "test_accuracy_mean": summary["test_accuracy_mean"],
                      "steps": summary["steps"], "wall_time_s": summary["wall_time_s"]}))
    return 0


def run_entry_point(fn, argv, *, debug: bool) -> int:
    """Call ``fn(argv)`` as a command: user errors become one line on stderr and status 2."""
    from mergejax.core.errors import UserError

    try:
        code = int(fn(argv) or 0)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at exit
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except (UserError, *USAGE_ERRORS) as e:
        if debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {' '.join(str(msg).split())} (--debug for the traceback)", file=sys.stderr)
        return 2


def quiet_libraries() -> None:
    """Silence absl/orbax/tensorstore chatter (entry points only)."""
    import logging
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass
    for name in ("absl", "orbax", "orbax.checkpoint", "jax._src.xla_bridge", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from mergejax.core.checkpoint import quiet_logging

    quiet_logging()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()]
        print("usage: mergejax COMMAND [args] [--debug]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    quiet_libraries()
    from mergejax.run import enable_compilation_cache

    enable_compilation_cache()
    module, func = COMMANDS[argv[0]][0].split(":")
    return run_entry_point(getattr(importlib.import_module(module), func), argv[1:], debug=debug)


if __name__ == "__main__":
    sys.exit(main())
