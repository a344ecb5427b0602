"""``mergejax average``: average orbax checkpoints, streaming, written atomically.

    mergejax average RUN_A RUN_B RUN_C --out soup/                     # uniform average
    mergejax average A B --weights 3 1 --out avg/                      # weighted
    mergejax average A B --align A --model cnn --out aligned/          # weight matching first
    mergejax average A B --recompute-bn digits --model cnn --out avg/  # SWA-style BN pass

A CKPT is any of: a ``fit`` work directory (its latest ``checkpoints/<step>``), a
``checkpoints`` directory, one ``checkpoints/<step>`` directory, a
:func:`mergejax.checkpoint.save` path, or the output of this command. Only ``params`` and
``batch_stats`` are read (``opt_state`` is skipped on disk). Memory: the running mean plus one
checkpoint (plus the reference with ``--align``), whatever the number of inputs. Every input
is read in the first input's dtypes (structure and shapes must match; errors name the leaf).

Output ``DIR``: ``DIR/checkpoint`` (``{'params', 'batch_stats'}``, readable with
``mergejax.checkpoint.load``) and ``DIR/average.json``; built in a temporary sibling and
renamed into place, so ``DIR`` is either absent or complete. Inputs are only read.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import time
import uuid
from typing import Sequence

import jax
import orbax.checkpoint as ocp

from mergejax import averaging
from mergejax import checkpoint as ckpt_lib

KEYS = ("params", "batch_stats")


def _is_item(d: str) -> bool:
    return os.path.isfile(os.path.join(d, "_METADATA"))


def _latest_step_dir(d: str) -> str | None:
    steps = [int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n))]
    return os.path.join(d, str(max(steps))) if steps else None


def resolve(path: str) -> str:
    """The orbax item directory holding the checkpoint that ``path`` names (see module doc)."""
    d = os.path.abspath(path)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    for cand in (d, os.path.join(d, "default"), os.path.join(d, "checkpoint")):
        if _is_item(cand):
            return cand
    for sub in (os.path.join(d, "checkpoints"), d):
        if os.path.isdir(sub) and (step := _latest_step_dir(sub)) is not None:
            return resolve(step)
    raise FileNotFoundError(f"{path} is not a checkpoint, a checkpoints/ directory or a fit work directory")


def _stored_shapes(item: str) -> dict[tuple, tuple] | None:
    """``{path: shape}`` from the item's ``_METADATA`` JSON (cheap: no tensorstore opens), or
    None if the file is not in the expected format."""
    try:
        with open(os.path.join(item, "_METADATA")) as f:
            meta = json.load(f)["tree_metadata"]
        return {tuple(str(k["key"]) for k in m["key_metadata"]): tuple(m["value_metadata"]["write_shape"]) for m in meta.values()}
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _keystr(path: tuple) -> str:
    return "".join(f"[{k!r}]" for k in path)


def _check_stored(item: str, target: dict, path: str) -> None:
    """Raise ``ValueError`` naming the first leaf whose presence or shape on disk differs from
    ``target`` (a tree of ``ShapeDtypeStruct``)."""
    stored = _stored_shapes(item)
    if stored is None:
        return
    want = {tuple(str(getattr(k, "key", k)) for k in p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    for p, shape in want.items():
        if p not in stored:
            raise ValueError(f"checkpoint {path} has no leaf {_keystr(p)} (the first checkpoint has one of shape {shape})")
        if tuple(stored[p]) != shape:
            raise ValueError(f"checkpoint {path} has leaf {_keystr(p)} of shape {tuple(stored[p])}, the first has {shape}")
    extra = sorted(p for p in stored if p[0] in target and p not in want)
    if extra:
        raise ValueError(f"checkpoint {path} has leaf {_keystr(extra[0])} that the first checkpoint does not have")


def load_variables(path: str, keys: Sequence[str] = KEYS, *, target: dict | None = None, ckptr=None) -> dict:
    """``{'params', 'batch_stats'}`` of the checkpoint at ``path`` (other entries not read).

    ``target`` (a tree of ``jax.ShapeDtypeStruct``, e.g. from :func:`abstract`) skips orbax's
    metadata read, which costs ~1.6 MB of memory that is never returned (orbax 0.12.8) — so a
    stream over N checkpoints reads it once. Structure and shapes are still checked against the
    stored ``_METADATA``; values are cast to ``target``'s dtypes. ``ckptr``: a reusable
    ``ocp.PyTreeCheckpointer``.
    """
    item = resolve(path)
    own = ckptr is None
    ckptr = ocp.PyTreeCheckpointer() if own else ckptr
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        if target is None:
            tree = ckptr.metadata(item).item_metadata.tree
            if "params" not in tree:
                raise ValueError(f"checkpoint {path} has no 'params' (top-level keys: {sorted(tree)})")
            target = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[k]) for k in keys if k in tree}
        else:
            _check_stored(item, target, path)
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), target)
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=dev), target)
        out = ckptr.restore(item, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
    finally:
        if own:
            ckptr.close()
    return {k: out.get(k, {}) for k in keys}


def abstract(tree: dict) -> dict:
    """``jax.ShapeDtypeStruct`` tree of ``tree`` (the ``target`` of :func:`load_variables`)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _model_for(name: str, variables: dict, model_kw: dict | None):
    from mergejax.models import make_model

    head = variables["params"].get("head", {}).get("Dense_0", {})
    if "bias" not in head:
        raise ValueError("cannot infer the number of classes: no params/head/Dense_0/bias in the checkpoint")
    return make_model(name, int(head["bias"].shape[0]), **(model_kw or {}))


def average_checkpoints(paths: Sequence[str], out: str, *, weights: Sequence[float] | None = None, align: str | None = None,
                        model: str | None = None, model_kw: dict | None = None, recompute_bn: str | None = None,
                        bn_batch_size: int = 128, overwrite: bool = False) -> dict:
    """Average the checkpoints at ``paths`` into ``out`` (see module doc); returns the summary."""
    t0 = time.perf_counter()
    if not paths:
        raise ValueError("no checkpoints to average")
    if weights is not None and len(weights) != len(paths):
        raise ValueError(f"got {len(weights)} weights for {len(paths)} checkpoints")
    if (align or recompute_bn) and not model:
        raise ValueError("--align and --recompute-bn need --model (the architecture, e.g. cnn, resnet20)")
    out = os.path.abspath(out)
    for p in paths:
        if os.path.abspath(p) == out or os.path.abspath(resolve(p)).startswith(out + os.sep):
            raise ValueError(f"--out {out} would overwrite input {p}")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    resolved = [resolve(p) for p in paths]
    ref = spec = net = None
    if align:
        from mergejax.units import unit_spec, variables_of

        ref = load_variables(align)
        net = _model_for(model, ref, model_kw)
        spec = unit_spec(net, variables_of(ref["params"], ref["batch_stats"]))
    state = None
    target = None
    ckptr = ocp.PyTreeCheckpointer()
    for i, p in enumerate(paths):
        try:
            v = load_variables(p, target=target, ckptr=ckptr)
        except ValueError as e:
            ckptr.close()
            raise ValueError(f"checkpoint {p} does not match {paths[0]}: {e}") from None
        target = target or abstract(v)
        if ref is not None:
            from mergejax.rebasin import weight_matching
            from mergejax.units import take_units

            averaging.check_compatible(ref, v, ("the reference", f"checkpoint {p}"))
            v = take_units(v, spec, weight_matching(spec, ref, v))
        w = 1.0 if weights is None else float(weights[i])
        if state is None:
            state = averaging.stream_init(v, w)
        else:
            try:
                state = averaging.stream_add(state, v, w)
            except ValueError as e:
                raise ValueError(f"checkpoint {p} does not match {paths[0]}: {e}") from None
        del v
    ckptr.close()
    result = state.mean
    if recompute_bn:
        from mergejax import data as data_lib
        from mergejax.swa import recompute_batch_stats
        from mergejax.train import model_apply_fn

        net = net or _model_for(model, result, model_kw)
        split = data_lib.load(recompute_bn, "train")
        result = {**result, "batch_stats": recompute_batch_stats(model_apply_fn(net), result["params"], result["batch_stats"],
                                                                 split, bn_batch_size)}
    summary = {"inputs": [os.path.abspath(p) for p in paths], "resolved": resolved, "weights": list(weights) if weights else None,
               "align": os.path.abspath(align) if align else None, "model": model, "model_kw": model_kw, "recompute_bn": recompute_bn,
               "num_leaves": len(jax.tree.leaves(result)), "wall_time_s": None}
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(tmp)
        ckpt_lib.save(os.path.join(tmp, "checkpoint"), result)
        summary["wall_time_s"] = time.perf_counter() - t0
        with open(os.path.join(tmp, "average.json"), "w") as f:
            json.dump(summary, f, indent=2)
        ckpt_lib.replace_dir(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return summary


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
