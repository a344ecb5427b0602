"""``mergejax`` command line: ``mergejax COMMAND [args]``.

Each command is ``name -> "module:function"``, imported only when used; the function takes
the remaining argv. Add a command by adding a line here.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("mergejax.cli:train", "train one model from a TrainConfig preset or overrides"),
    "average": ("mergejax.average_cli:main", "average checkpoints (streaming; --weights, --align, --recompute-bn)"),
    "merge": ("mergejax.merge_cli:main", "merge two trained networks (concat, gates, compress, fine-tune)"),
}


def train(argv):
    """``mergejax train --set dataset=digits --set model=cnn --out DIR``: train, checkpoint, evaluate."""
    import argparse
    import json
    import os

    from mergejax.config import TrainConfig, override, to_dict
    from mergejax.run import train_and_evaluate

    p = argparse.ArgumentParser(prog="mergejax train", description=train.__doc__)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig field, e.g. --set model=resnet20 --set dataset=cifar10")
    p.add_argument("--out", required=True, help="work directory: checkpoints/, metrics.jsonl, summary.json")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    config = override(TrainConfig(), args.overrides)
    _, summary = train_and_evaluate(config, args.out, progress=not args.quiet)
    summary = {k: v for k, v in summary.items() if k != "history"} | {"config": to_dict(config)}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: summary[k] for k in ("test_accuracy", "test_loss", "steps", "wall_time_s")}))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()]
        print("usage: mergejax COMMAND [args]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    from mergejax.run import enable_compilation_cache

    enable_compilation_cache()
    module, func = COMMANDS[argv[0]][0].split(":")
    result = getattr(importlib.import_module(module), func)(argv[1:])
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
