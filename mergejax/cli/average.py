"""``mergejax average``: average orbax checkpoints, streaming, written atomically.

    mergejax average RUN_A RUN_B RUN_C --out soup/                     # uniform average
    mergejax average A B --weights 3 1 --out avg/                      # weighted
    mergejax average A B --align A --model cnn --out aligned/          # weight matching first
    mergejax average A B --recompute-bn digits --model cnn --out avg/  # SWA-style BN pass

A CKPT is anything :func:`mergejax.core.checkpoint.resolve` accepts: a ``fit`` work directory (its
newest intact ``checkpoints/<step>``), a ``checkpoints`` directory, one step directory, a
:func:`mergejax.core.checkpoint.save` path, or the output of this command. Every input is verified
against its ``checksums.json``. Only ``params`` and ``batch_stats`` are read (``opt_state`` is
skipped on disk). Memory: the running mean plus one checkpoint (plus the reference with
``--align``), whatever the number of inputs. Every input is read in the first input's dtypes
(structure and shapes must match; errors name the leaf and both shapes).

Output ``DIR``: ``DIR/checkpoint`` (``{'params', 'batch_stats'}``, readable with
``mergejax.core.checkpoint.load``), ``DIR/average.json`` and ``DIR/manifest.json`` (what was
averaged, for refusing a different request into the same ``DIR``); built in a temporary
sibling and renamed into place, so ``DIR`` is either absent or complete. Inputs are only read;
an ``--out`` inside (or containing) an input is refused.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import time
from typing import Sequence

import jax
import orbax.checkpoint as ocp

from mergejax.averaging import weights as averaging
from mergejax.core import rundir
from mergejax.core import checkpoint as ckpt_lib
from mergejax.core.errors import ConfigMismatch

KEYS = ("params", "batch_stats")


def load_variables(path: str, keys: Sequence[str] = KEYS, *, target: dict | None = None, ckptr=None,
                   other: str = "the target") -> dict:
    """``{'params', 'batch_stats'}`` of the checkpoint at ``path`` (other entries not read).

    The checkpoint's files are verified first (:func:`mergejax.core.checkpoint.verify`). ``target``
    (a tree of ``jax.ShapeDtypeStruct``, e.g. from :func:`abstract`) skips orbax's metadata
    read, which costs ~1.6 MB of memory that is never returned (orbax 0.12.8) — so a stream
    over N checkpoints reads it once. Structure and shapes are still checked against the
    stored per-leaf shapes (``checksums.json``, else ``_METADATA``; the error names the leaf,
    both shapes and ``other``); values are cast to ``target``'s dtypes. ``ckptr``: a reusable
    ``ocp.PyTreeCheckpointer``.
    """
    item = ckpt_lib.resolve(path)
    ckpt_lib.verify(item)
    own = ckptr is None
    ckptr = ocp.PyTreeCheckpointer() if own else ckptr
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        if target is None:
            try:
                tree = ckptr.metadata(item).item_metadata.tree
            except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged file
                raise ckpt_lib.unreadable(path, e) from e
            if "params" not in tree:
                raise ckpt_lib.CheckpointMismatch(f"checkpoint {path} has no 'params' (top-level keys: {sorted(tree)})")
            target = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[k]) for k in keys if k in tree}
        else:
            ckpt_lib.check_leaves(item, target, name=f"checkpoint {path}", other=other, partial=True)
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), target)
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=dev), target)
        try:
            out = ckptr.restore(item, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
        except Exception as e:  # noqa: BLE001
            raise ckpt_lib.unreadable(path, e) from e
    finally:
        if own:
            ckptr.close()
    ckpt_lib.check_leaf_hashes(item, out)
    return {k: out.get(k, {}) for k in keys}


def abstract(tree: dict) -> dict:
    """``jax.ShapeDtypeStruct`` tree of ``tree`` (the ``target`` of :func:`load_variables`)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _model_for(name: str, variables: dict, model_kw: dict | None):
    from mergejax.core.models import make_model

    # The classifier is the one kernel under the ``head`` layer (every model names its last layer
    # "head"); its output axis is the number of classes, whatever Linen named the Dense inside.
    kernels = [x for p, x in jax.tree_util.tree_flatten_with_path(variables["params"].get("head", {}))[0]
               if getattr(p[-1], "key", None) == "kernel"]
    if len(kernels) != 1:
        raise ValueError(f"cannot infer the number of classes: expected one kernel under params/head, found {len(kernels)}")
    return make_model(name, int(kernels[0].shape[-1]), **(model_kw or {}))


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def average_checkpoints(paths: Sequence[str], out: str, *, weights: Sequence[float] | None = None, align: str | None = None,
                        model: str | None = None, model_kw: dict | None = None, recompute_bn: str | None = None,
                        bn_batch_size: int = 128, overwrite: bool = False) -> dict:
    """Average the checkpoints at ``paths`` into ``out`` (see module doc); returns the summary.

    ``out`` gets a ``manifest.json`` (kind ``average``, these arguments, fingerprints of the
    inputs): the same request again returns the stored summary; a different one is refused
    (:class:`~mergejax.core.errors.ConfigMismatch`) unless ``overwrite``. An ``out`` that is,
    is inside or contains an input is refused.
    """
    t0 = time.perf_counter()
    if not paths:
        raise ValueError("no checkpoints to average")
    if weights is not None and len(weights) != len(paths):
        raise ValueError(f"got {len(weights)} weights for {len(paths)} checkpoints")
    if (align or recompute_bn) and not model:
        raise ValueError("--align and --recompute-bn need --model (the architecture, e.g. cnn, resnet20)")
    out = os.path.abspath(out)
    ckpt_lib.refuse_overlap(out, {str(i + 1): p for i, p in enumerate(paths)} | ({"--align": align} if align else {}))
    resolved = [ckpt_lib.resolve(p) for p in paths]
    inputs = {str(i): rundir.fingerprint_path(r) for i, r in enumerate(resolved)}
    if align:
        inputs["align"] = rundir.fingerprint_path(ckpt_lib.resolve(align))
    config = {"weights": [float(w) for w in weights] if weights else None, "align": bool(align), "model": model,
              "model_kw": model_kw or {}, "recompute_bn": recompute_bn, "bn_batch_size": bn_batch_size if recompute_bn else None}
    manifest = rundir.make_manifest("average", config, inputs)
    if os.path.exists(out) and not overwrite:
        stored = _read_json(os.path.join(out, rundir.MANIFEST))
        if stored is None:
            raise ConfigMismatch(f"{out} exists and was not written by mergejax average (no {rundir.MANIFEST}); "
                                 f"use another --out, or --overwrite to replace it")
        diff = rundir.differences(stored, manifest)
        if diff:
            raise ConfigMismatch(f"{out} holds a different average: {'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}. "
                                 f"Use another --out, or --overwrite to replace it")
        done = _read_json(os.path.join(out, "average.json"))
        if done is not None:
            return done
    ref = spec = net = None
    if align:
        from mergejax.core.units import unit_spec, variables_of

        ref = load_variables(align)
        net = _model_for(model, ref, model_kw)
        spec = unit_spec(net, variables_of(ref["params"], ref["batch_stats"]))
    state = None
    target = None
    ckptr = ocp.PyTreeCheckpointer()
    try:
        for i, p in enumerate(paths):
            v = load_variables(p, target=target, ckptr=ckptr, other=paths[0])
            target = target or abstract(v)
            if ref is not None:
                from mergejax.averaging.rebasin import weight_matching
                from mergejax.core.units import take_units

                _same(ref, v, ("the reference", f"checkpoint {p}"))
                v = take_units(v, spec, weight_matching(spec, ref, v))
            w = 1.0 if weights is None else float(weights[i])
            if state is None:
                state = averaging.stream_init(v, w)
            else:
                _same(state.mean, v, (paths[0], f"checkpoint {p}"))
                state = averaging.stream_add(state, v, w)
            del v
    finally:
        ckptr.close()
    result = state.mean
    if recompute_bn:
        from mergejax.core import data as data_lib
        from mergejax.ensembles.swa import recompute_batch_stats
        from mergejax.core.train import model_apply_fn

        net = net or _model_for(model, result, model_kw)
        split = data_lib.load(recompute_bn, "train")
        result = {**result, "batch_stats": recompute_batch_stats(model_apply_fn(net), result["params"], result["batch_stats"],
                                                                 split, bn_batch_size)}
    summary = {"inputs": [os.path.abspath(p) for p in paths], "resolved": resolved, "weights": list(weights) if weights else None,
               "align": os.path.abspath(align) if align else None, "model": model, "model_kw": model_kw, "recompute_bn": recompute_bn,
               "num_leaves": len(jax.tree.leaves(result)), "wall_time_s": None}
    rundir.remove_stale_temps(out)  # what a killed earlier attempt left half-written beside it
    tmp = rundir.temp_sibling(out)
    try:
        os.makedirs(tmp)
        ckpt_lib.save(os.path.join(tmp, "checkpoint"), result)
        summary["wall_time_s"] = time.perf_counter() - t0
        rundir.write_json(os.path.join(tmp, "average.json"), summary)
        rundir.write_json(os.path.join(tmp, rundir.MANIFEST), manifest)
        ckpt_lib.replace_dir(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return summary


def _same(a: dict, b: dict, names: tuple[str, str]) -> None:
    """:func:`averaging.check_compatible` as a one-line :class:`CheckpointMismatch`."""
    try:
        averaging.check_compatible(a, b, names)
    except ValueError as e:
        raise ckpt_lib.CheckpointMismatch(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mergejax average", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per CKPT (normalised)")
    p.add_argument("--align", metavar="REFERENCE", default=None, help="permute every CKPT's units to match REFERENCE first")
    p.add_argument("--recompute-bn", metavar="DATASET", default=None, help="re-estimate BatchNorm statistics on DATASET's train split")
    p.add_argument("--model", default=None, help="architecture name (needed by --align / --recompute-bn)")
    p.add_argument("--model-kw", action="append", default=[], metavar="KEY=VALUE",
                   help="model constructor argument as a Python literal, e.g. --model-kw width=2.0 --model-kw 'channels=(8,16,32)'")
    p.add_argument("--bn-batch-size", type=int, default=128)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    model_kw = {}
    for item in args.model_kw:
        key, _, value = item.partition("=")
        try:
            model_kw[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(f"--model-kw {item!r}: value must be a Python literal") from None
    summary = average_checkpoints(args.checkpoints, args.out, weights=args.weights, align=args.align, model=args.model,
                                  model_kw=model_kw, recompute_bn=args.recompute_bn, bn_batch_size=args.bn_batch_size,
                                  overwrite=args.overwrite)
    print(json.dumps({"out": os.path.abspath(args.out), "n": len(args.checkpoints), "wall_time_s": round(summary["wall_time_s"], 3)}))
    return 0
