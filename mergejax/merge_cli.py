"""``mergejax merge CKPT_A CKPT_B --out DIR [--preset tiny|paper] [--set key=value] [--overwrite]``.

Each CKPT is anything :func:`mergejax.checkpoint.resolve` accepts: a ``mergejax train --out``
directory (its newest intact checkpoint), one step directory of it (``RUN/checkpoints/44``),
or a directory written by :func:`mergejax.checkpoint.save` holding ``{'params',
'batch_stats'}``. For a run or one of its steps the teachers' model, width and dataset come
from the run's ``summary.json`` (or ``manifest.json``); ``--set`` overrides them. Inputs are
verified and only read.

Writes ``DIR/student`` (a checkpoint of the merged student's ``{'params', 'batch_stats'}``),
``DIR/summary.json`` (accuracy after every stage, gate statistics, config) and
``DIR/manifest.json`` (the resolved config and fingerprints of both teachers). The same command
again resumes (``DIR/work`` keeps the gate and fine-tune checkpoints) or returns the finished
result; another config or other teachers into the same ``DIR`` are refused unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from mergejax import checkpoint as ckpt_lib
from mergejax import data as data_lib
from mergejax import rundir
from mergejax.averaging import check_compatible
from mergejax.config import choose_preset, override, to_dict
from mergejax.errors import UserError
from mergejax.merging.pipeline import PRESETS, merge

TEACHER_KEYS = ("dataset", "model", "model_kwargs")


def load_teacher(path: str) -> dict:
    """``{'params', 'batch_stats'}`` of a teacher checkpoint (see the module docstring)."""
    tree = ckpt_lib.load(ckpt_lib.resolve(path))
    if "params" not in tree:
        raise ckpt_lib.CheckpointMismatch(f"checkpoint {path} has no 'params' (top-level keys: {sorted(tree)})")
    return jax.tree.map(jnp.asarray, {"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}})


def teacher_config(path: str) -> dict:
    """Dataset, model and model kwargs of the run that wrote the checkpoint at ``path``
    (``{}`` when it has no run directory or the run records none)."""
    run = ckpt_lib.run_dir_of(path)
    if run is None:
        return {}
    cfg = {}
    for name, pick in (("summary.json", lambda d: d.get("config")),
                       (rundir.MANIFEST, lambda d: (d.get("config") or {}).get("caller", {}).get("train_config"))):
        try:
            cfg = pick(rundir.read_json(os.path.join(run, name))) or {}
        except (OSError, ValueError, AttributeError):
            cfg = {}
        if cfg:
            break
    return {k: _tuples(cfg[k]) for k in TEACHER_KEYS if k in cfg}


def _tuples(x):
    """JSON lists back to the tuples the config held (model fields must be hashable)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _same(a, b, names: tuple[str, str], hint: str = "") -> None:
    try:
        check_compatible(a, b, names)
    except ValueError as e:
        raise ckpt_lib.CheckpointMismatch(f"{e}{hint}") from None


def _check_teachers(config, va: dict, vb: dict, names: tuple[str, str], train: data_lib.Split) -> None:
    """One line naming the first leaf (and both shapes) where the teachers differ from each
    other or from ``config``'s model, instead of an error deep inside Flax."""
    from mergejax.models import init_variables, make_model
    from mergejax.units import variables_of

    _same(va, vb, names)
    net = make_model(config.model, train.num_classes, **dict(config.model_kwargs))
    shape = (1, *train.images.shape[1:])
    expected = jax.eval_shape(lambda: variables_of(*init_variables(net, jax.random.key(0), shape)))
    _same(expected, va, (f"model {config.model} {dict(config.model_kwargs)}", names[0]),
          "; pass the teachers' architecture with --set model=... --set model_kwargs=...")


def main(argv) -> int:
    """Merge two trained networks: concat, learn gates, compress, fine-tune; save the student."""
    p = argparse.ArgumentParser(prog="mergejax merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt_a")
    p.add_argument("ckpt_b")
    p.add_argument("--out", required=True, help="output directory: student/, summary.json, manifest.json")
    p.add_argument("--preset", default="tiny", help=f"MergeConfig preset: {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="MergeConfig field, e.g. --set gate_epochs=10 --set dataset=cifar10")
    p.add_argument("--overwrite", action="store_true", help="replace a different merge already in --out")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    ckpt_lib.refuse_overlap(args.out, {"a": args.ckpt_a, "b": args.ckpt_b})
    item_a, item_b = ckpt_lib.resolve(args.ckpt_a), ckpt_lib.resolve(args.ckpt_b)
    config = choose_preset(PRESETS, args.preset)
    ca, cb = teacher_config(args.ckpt_a), teacher_config(args.ckpt_b)
    if ca and cb and ca != cb:
        raise UserError(f"teachers were trained with different settings: {ca} vs {cb}")
    config = dataclasses.replace(config, **(ca or cb))  # the teachers' model and data, then the user's overrides
    config = override(config, args.overrides)
    va, vb = load_teacher(item_a), load_teacher(item_b)
    train = data_lib.load(config.dataset, "train")
    _check_teachers(config, va, vb, (f"checkpoint {args.ckpt_a}", f"checkpoint {args.ckpt_b}"), train)
    manifest = rundir.make_manifest("merge", to_dict(config),
                                    {"a": rundir.fingerprint_path(item_a), "b": rundir.fingerprint_path(item_b)})
    keys = ("big_start", "big_student_step0", "big_student_after_gates", "after_compression", "after_finetune")
    with rundir.RunDir(args.out, manifest, overwrite=args.overwrite) as rd:
        out = rd.result()
        if out is None:
            test = data_lib.load(config.dataset, "test")
            student, summary = merge(va, vb, config, train, test, workdir=os.path.join(rd.path, "work"),
                                     progress=not args.quiet)
            ckpt_lib.save(os.path.join(rd.path, "student"), student, overwrite=True)
            out = {k: summary[k] for k in keys} | {
                "gate_binariness": summary["gate_binariness"], "kept_from_teacher_a": summary.get("kept_from_teacher_a"),
                "steps": summary["steps"], "timing_s": summary["timing_s"], "config": to_dict(config),
            }
            rundir.write_json(os.path.join(rd.path, "summary.json"), out)
            out = rd.finish(out)
    print(json.dumps({k: round(out[k]["accuracy"], 4) for k in keys}))
    return 0
