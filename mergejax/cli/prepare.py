"""``mergejax prepare DATASET... [--data-dir DIR]``: download and convert datasets ahead of time.

    mergejax prepare cifar10                          # into $MERGEJAX_DATA (~/.cache/mergejax)
    mergejax prepare mnist svhn_cropped --data-dir /data/mergejax

For each TFDS dataset, TFDS downloads the original files into ``DIR/tfds/downloads`` and
converts them to ArrayRecord files under ``DIR/tfds/NAME/VERSION`` (this needs network, or
the original files already in ``DIR/tfds/downloads/manual``, and TensorFlow:
``pip install 'mergejax[prepare]'``); then every split is written to mergejax's uint8 cache
``DIR/npz/NAME-SPLIT.npz``, one line per split saying where. What is already there is reused.
Afterwards ``mergejax.core.data.load`` and ``mergejax train`` need neither network nor TensorFlow:
copy ``DIR`` to an offline machine and point ``MERGEJAX_DATA`` at it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from mergejax.core import data
from mergejax.core.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mergejax prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="+", metavar="DATASET", help=f"one or more of: {', '.join(data.DATASETS)}")
    p.add_argument("--data-dir", help="where data goes (default: $MERGEJAX_DATA, else ~/.cache/mergejax)")
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    unknown = [n for n in args.datasets if n not in data.DATASETS]
    if unknown:
        raise UserError(f"unknown dataset {unknown[0]!r}; available: {', '.join(data.DATASETS)}")
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir or data.default_data_dir()))
    for name in dict.fromkeys(args.datasets):
        if name == "digits":
            print("digits: bundled with scikit-learn, nothing to prepare", flush=True)
            continue
        for split in data.splits_of(name):
            path, n, shape = data.prepare_split(name, split, data_dir=data_dir)
            print(f"{name} {split}: {n} images {'x'.join(map(str, shape))} -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
