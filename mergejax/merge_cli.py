"""``mergejax merge CKPT_A CKPT_B --out DIR [--preset tiny|paper] [--set key=value]``.

Each CKPT is a ``mergejax train --out`` directory (its latest checkpoint; model, width and
dataset are read from its ``summary.json``), one step directory of it, or a directory written
by :func:`mergejax.checkpoint.save` holding ``{'params', 'batch_stats'}``. Writes
``DIR/student`` (a checkpoint of the merged student's ``{'params', 'batch_stats'}``) and
``DIR/summary.json`` (accuracy after every stage, gate statistics, config).
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
from mergejax import report
from mergejax.config import choose_preset, override, to_dict
from mergejax.merging.pipeline import PRESETS, merge


def _resolve(path: str) -> str:
    path = os.path.abspath(path)
    ckdir = os.path.join(path, "checkpoints")
    if os.path.isdir(ckdir):
        steps = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())
        if not steps:
            raise FileNotFoundError(f"{ckdir} holds no step checkpoints")
        path = os.path.join(ckdir, str(steps[-1]))
    if os.path.isdir(os.path.join(path, "default")):
        path = os.path.join(path, "default")
    return path


def load_teacher(path: str) -> dict:
    """``{'params', 'batch_stats'}`` of a teacher checkpoint (see the module docstring)."""
    tree = ckpt_lib.load(_resolve(path))
    if "params" not in tree:
        raise ValueError(f"checkpoint {path} has no 'params' (top-level keys: {sorted(tree)})")
    return jax.tree.map(jnp.asarray, {"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}})


def _teacher_config(path: str) -> dict:
    summary = os.path.join(os.path.abspath(path), "summary.json")
    if not os.path.exists(summary):
        return {}
    with open(summary) as f:
        cfg = json.load(f).get("config", {})
    return {k: cfg[k] for k in ("dataset", "model", "model_kwargs") if k in cfg}


def main(argv) -> int:
    """Merge two trained networks: concat, learn gates, compress, fine-tune; save the student."""
    p = argparse.ArgumentParser(prog="mergejax merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt_a")
    p.add_argument("ckpt_b")
    p.add_argument("--out", required=True, help="output directory: student/, summary.json")
    p.add_argument("--preset", default="tiny", help=f"MergeConfig preset: {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="MergeConfig field, e.g. --set gate_epochs=10 --set dataset=cifar10")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    config = choose_preset(PRESETS, args.preset)
    ca, cb = _teacher_config(args.ckpt_a), _teacher_config(args.ckpt_b)
    if ca and cb and ca != cb:
        raise SystemExit(f"teachers were trained with different settings: {ca} vs {cb}")
    config = dataclasses.replace(config, **ca)  # the teachers' model and data, then the user's overrides
    config = override(config, args.overrides)
    va, vb = load_teacher(args.ckpt_a), load_teacher(args.ckpt_b)
    train = data_lib.load(config.dataset, "train")
    test = data_lib.load(config.dataset, "test")
    student, summary = merge(va, vb, config, train, test, workdir=os.path.join(args.out, "work"), progress=not args.quiet)
    ckpt_lib.save(os.path.join(args.out, "student"), student, overwrite=True)
    keys = ("big_start", "big_student_step0", "big_student_after_gates", "after_compression", "after_finetune")
    out = {k: summary[k] for k in keys} | {
        "gate_binariness": summary["gate_binariness"], "kept_from_teacher_a": summary.get("kept_from_teacher_a"),
        "steps": summary["steps"], "timing_s": summary["timing_s"], "config": to_dict(config),
    }
    report.write_json(os.path.join(args.out, "summary.json"), out)
    print(json.dumps({k: round(summary[k]["accuracy"], 4) for k in keys}))
    return 0
