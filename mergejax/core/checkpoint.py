"""Orbax checkpoints of plain pytrees that know when they are damaged.

* :func:`save` writes a checkpoint atomically (temporary sibling, then rename) with a
  ``checksums.json``: size and sha256 of every file orbax wrote, and per leaf its path,
  shape, dtype and the sha256 of its bytes. NaN/Inf leaves are refused.
* :func:`verify` re-hashes the files; :func:`load` verifies, restores and re-checks the
  leaves. Damage is a :class:`~mergejax.core.errors.CorruptCheckpoint` naming the file.
* :class:`Manager` keeps step directories ``DIR/<step>``; a corrupt newest step is moved
  aside (``<step>.corrupt-<id>``, never deleted) and the previous one restored.
* :func:`resolve` turns what a user names (run, ``checkpoints/``, step, :func:`save` path,
  ``average`` output) into one checkpoint directory; :func:`run_dir_of` finds its run.

Checkpoints written before ``checksums.json`` existed still load, with one warning line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import uuid
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mergejax.core import trees
from mergejax.core.errors import CorruptCheckpoint, UserError
from mergejax.core.rundir import remove_stale_temps, temp_sibling, write_json

CHECKSUMS = "checksums.json"
_TEMP = re.compile(r"^\d+\.(tmp|old)-")  # a Manager step's leftovers from a killed save (rundir.temp_sibling's, orbax's, .old-)


class NoCheckpoint(UserError, FileNotFoundError):
    """Nothing that looks like a checkpoint where one was named."""


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint's leaves differ (presence or shape) from those asked for."""


# ---------------------------------------------------------------- logging


class _DropReraisedTracebacks(logging.Filter):
    """Orbax logs the full traceback of a failed background write at ERROR and then raises the
    same error to the caller; the caller's one-line message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and "orbax" in record.pathname and record.levelno < logging.CRITICAL)


class _DropOrphanedTensorstoreTasks(logging.Filter):
    """When one read of a damaged checkpoint fails, orbax closes its event loop and asyncio
    logs the sibling reads' identical errors as "Task exception was never retrieved"."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (str(record.msg).startswith("Task exception was never retrieved") and "tensorstore" in str(exc))


def _drop_closed_loop_callbacks(hook):
    # tensorstore completes those sibling reads on its own threads after the loop is closed;
    # each callback then raises "Event loop is closed" into sys.unraisablehook.
    def unraisable(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            hook(u)

    unraisable.mergejax_quiet = True
    return unraisable


def quiet_logging() -> None:
    """Set absl and the orbax/tensorstore loggers to ERROR and drop the tracebacks orbax and
    tensorstore print for errors that reach the caller anyway (entry points call this;
    library code never does)."""
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass
    for name, filt in (("absl", _DropReraisedTracebacks), ("orbax", _DropReraisedTracebacks),
                       ("orbax.checkpoint", _DropReraisedTracebacks), ("tensorstore", None), ("etils", None),
                       ("asyncio", _DropOrphanedTensorstoreTasks)):
        logger = logging.getLogger(name)
        if name != "asyncio":
            logger.setLevel(logging.ERROR)
        if filt is not None and not any(isinstance(f, filt) for f in logger.filters):
            logger.addFilter(filt())
    if not getattr(sys.unraisablehook, "mergejax_quiet", False):
        sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


# ---------------------------------------------------------------- hashing


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_array(x: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8))).hexdigest()


_norm = trees.path_tuple  # a key path as plain strings, as orbax stores it (dict key, index or field name)


def _keystr(keys: Iterable[str]) -> str:
    return "".join(f"[{k!r}]" for k in keys)


def _host_leaves(tree: Any) -> list[tuple[str, tuple[str, ...], np.ndarray]]:
    """``(keystr, normalised path, host array)`` per array leaf; ``None`` leaves and leaves
    that are not numbers are left out."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
        try:
            arr = np.asarray(leaf)
        except Exception:  # noqa: BLE001 - orbax reports unsupported leaves itself
            continue
        if arr.dtype.kind in "OUSM" or (arr.dtype.kind == "V" and arr.dtype.itemsize == 0):
            continue
        out.append((jax.tree_util.keystr(path), _norm(path), arr))
    return out


def _first_nonfinite(leaves: list[tuple[str, tuple, np.ndarray]]) -> str | None:
    """Keystr of the first floating leaf holding NaN/Inf, or None."""
    for name, _, arr in leaves:
        if jnp.issubdtype(arr.dtype, jnp.inexact) and not np.isfinite(arr).all():
            return name
    return None


def _file_records(root: str) -> dict[str, dict]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            full = os.path.join(d, f)
            rel = os.path.relpath(full, root)
            if rel != CHECKSUMS:
                out[rel] = {"size": os.path.getsize(full), "sha256": _sha256_file(full)}
    return dict(sorted(out.items()))


# ---------------------------------------------------------------- save / load


def _checkpointer() -> ocp.Checkpointer:
    # Synchronous: no background thread outlives the call (the async one's event loop printed
    # "Event loop is closed" at interpreter exit).
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _os_error(e: BaseException, path: str) -> OSError | None:
    """The OSError behind a tensorstore write failure (it raises ValueError with
    ``os_error_code='28'`` in its message), or None."""
    m = re.search(r"os_error_code='?(\d+)", str(e))
    code = int(m.group(1)) if m else (errno.ENOSPC if "No space left" in str(e) else None)
    if code is None:
        return None
    return OSError(code, f"could not write checkpoint {path}: {os.strerror(code)}")


def save(path: str, tree: Any, *, overwrite: bool = False, allow_nonfinite: bool = False) -> str:
    """Write ``tree`` to ``path`` atomically (a temporary sibling, then rename), with
    ``checksums.json``. Returns ``path`` (absolute).

    An existing ``path`` is never touched unless ``overwrite``; even then it is replaced only
    after the new checkpoint is complete. A floating leaf holding NaN/Inf raises
    ``FloatingPointError`` naming it unless ``allow_nonfinite``. A failed write (a full disk)
    raises ``OSError`` and leaves nothing behind.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"checkpoint {path} already exists (pass overwrite=True to replace it)")
    leaves = _host_leaves(tree)
    if not allow_nonfinite and (bad := _first_nonfinite(leaves)) is not None:
        raise FloatingPointError(f"refusing to save checkpoint {path}: leaf {bad} holds NaN/Inf (allow_nonfinite=True saves it anyway)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_temps(path)  # a killed earlier save's half-written copy
    tmp = temp_sibling(path)
    try:
        with _checkpointer() as ckptr:
            ckptr.save(tmp, args=ocp.args.StandardSave(tree))
        write_json(os.path.join(tmp, CHECKSUMS), {
            "format": 1,
            "files": _file_records(tmp),
            "leaves": {name: {"path": list(key), "shape": list(arr.shape), "dtype": str(arr.dtype), "sha256": _sha256_array(arr)}
                       for name, key, arr in leaves},
        })
        replace_dir(tmp, path)
    except BaseException as e:
        _remove_partial(tmp)
        err = None if isinstance(e, OSError) else _os_error(e, path)
        if err is not None:
            raise err from e
        raise
    return path


def _remove_partial(tmp: str) -> None:
    parent, base = os.path.split(tmp)
    for name in os.listdir(parent) if os.path.isdir(parent) else ():
        if name == base or name.startswith(base + "."):  # orbax's own ``<tmp>.orbax-checkpoint-tmp*``
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def replace_dir(tmp: str, path: str) -> None:
    """Move the finished directory ``tmp`` to ``path``; an existing ``path`` is removed
    only after the new one is in place."""
    if os.path.exists(path):
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)


def _read_checksums(path: str) -> dict | None:
    cpath = os.path.join(path, CHECKSUMS)
    if not os.path.exists(cpath):
        return None
    try:
        with open(cpath, "rb") as f:
            sums = json.loads(f.read().decode())
        if not isinstance(sums.get("files"), dict) or not isinstance(sums.get("leaves", {}), dict):
            raise ValueError("no 'files' table")
    except (OSError, ValueError, AttributeError) as e:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {CHECKSUMS} is unreadable ({_first_line(e)})") from None
    return sums


def _verify_files(path: str, *, warn: bool = True) -> None:
    """Check every file listed in ``path/checksums.json`` (see :func:`verify`)."""
    sums = _read_checksums(path)
    if sums is None:
        if warn:
            print(f"warning: checkpoint {path} has no {CHECKSUMS} (written by an older mergejax); reading it unverified",
                  file=sys.stderr)
        return
    for rel, rec in sums["files"].items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {rel} is missing")
        size = os.path.getsize(full)
        if size != rec.get("size"):
            how = "truncated" if size < rec.get("size", 0) else "longer than written"
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {rel} is {how} ({size} bytes, {rec.get('size')} written)")
        if _sha256_file(full) != rec.get("sha256"):
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {rel} was altered (sha256 differs from the one written)")


def verify(path: str) -> None:
    """Raise :class:`CorruptCheckpoint` (one line naming the file, relative to ``path``) if a
    file listed in ``path/checksums.json`` is missing, truncated or altered. A checkpoint
    without checksums is accepted with a warning on stderr."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise NoCheckpoint(f"no checkpoint at {path}")
    _verify_files(path)


def check_leaf_hashes(path: str, tree: Any) -> None:
    """Raise :class:`CorruptCheckpoint` if a leaf of ``tree``, restored from ``path``, differs
    from the bytes recorded at save (leaves restored in another dtype or shape, or absent
    from ``checksums.json``, are not compared)."""
    sums = _read_checksums(path)
    if not sums:
        return
    recorded = {tuple(r["path"]): (name, r) for name, r in sums.get("leaves", {}).items()}
    for name, key, arr in _host_leaves(tree):
        if key not in recorded:
            continue
        stored_name, rec = recorded[key]
        if list(arr.shape) == rec["shape"] and str(arr.dtype) == rec["dtype"] and _sha256_array(arr) != rec["sha256"]:
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt: leaf {stored_name} restored with other values than were saved")


def leaf_shapes(path: str) -> dict[tuple[str, ...], tuple[str, tuple[int, ...]]] | None:
    """``{leaf path: (keystr, shape)}`` of the checkpoint at ``path``, read from
    ``checksums.json`` or else orbax's ``_METADATA`` (no array is opened; shape None where it
    does not say); None if neither can be read. ``None`` leaves (optax states) are not listed."""
    try:
        sums = _read_checksums(path)
    except CorruptCheckpoint:
        sums = None
    if sums is not None and sums.get("leaves") is not None:
        return {tuple(r["path"]): (name, tuple(r["shape"])) for name, r in sums["leaves"].items()}
    try:
        with open(os.path.join(path, "_METADATA")) as f:
            meta = json.load(f)["tree_metadata"]
        out = {}
        for m in meta.values():
            keys, value = tuple(str(k["key"]) for k in m["key_metadata"]), m["value_metadata"]
            if value.get("value_type") != "None":
                shape = value.get("write_shape")  # absent for numpy leaves
                out[keys] = (_keystr(keys), None if shape is None else tuple(shape))
        return out
    except (OSError, KeyError, TypeError, ValueError):
        return None


def check_leaves(path: str, target: Any, *, name: str | None = None, other: str = "the target", partial: bool = False) -> None:
    """Raise :class:`CheckpointMismatch` naming the first leaf whose presence or shape in the
    checkpoint at ``path`` differs from ``target`` (arrays or ``ShapeDtypeStruct``). With
    ``partial`` only the top-level entries of ``target`` are compared."""
    stored = leaf_shapes(path)
    if stored is None:
        return
    name = name or f"checkpoint {path}"
    want = {}
    for p, x in jax.tree_util.tree_flatten_with_path(target)[0]:
        key, shape = _norm(p), tuple(np.shape(x))
        want[key] = shape
        if key not in stored:
            raise CheckpointMismatch(f"{name} has no leaf {jax.tree_util.keystr(p)} ({other} has one of shape {shape})")
        if stored[key][1] is not None and stored[key][1] != shape:
            raise CheckpointMismatch(f"{name} has leaf {jax.tree_util.keystr(p)} of shape {stored[key][1]}, {other} has {shape}")
    tops = {k[0] for k in want}
    extra = [v[0] for k, v in sorted(stored.items()) if k not in want and (not partial or k[:1] and k[0] in tops)]
    if extra:
        raise CheckpointMismatch(f"{name} has leaf {extra[0]} that {other} does not have")


def _item(path: str) -> str | None:
    """The directory holding the checkpoint's files: ``path`` or, for a step written by the
    orbax CheckpointManager of older versions, ``path/default``."""
    if any(os.path.isfile(os.path.join(path, f)) for f in (CHECKSUMS, "_METADATA")):
        return path
    if os.path.isfile(os.path.join(path, "default", "_METADATA")):
        return os.path.join(path, "default")
    return None


def load(path: str, target: Any | None = None, *, verify: bool = True) -> Any:
    """Read a checkpoint written by :func:`save` or :class:`Manager`.

    ``target`` (arrays or ``jax.ShapeDtypeStruct``) fixes structure, shapes and dtypes;
    without it the stored tree is returned as saved. With ``verify`` (default) files and
    leaves are checked against ``checksums.json``: damage raises :class:`CorruptCheckpoint`,
    a target of other shapes :class:`CheckpointMismatch`, each with one line.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise NoCheckpoint(f"no checkpoint at {path}")
    item = _item(path)
    if item is None:
        raise NoCheckpoint(f"no checkpoint at {path} (neither {CHECKSUMS} nor orbax's _METADATA in it)")
    if verify:
        _verify_files(item)
    abstract = None
    if target is not None:
        check_leaves(item, target)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
        with _checkpointer() as ckptr:
            tree = ckptr.restore(item, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for a damaged file
        raise unreadable(path, e) from e
    if verify:
        check_leaf_hashes(item, tree)
    return tree


def unreadable(path: str, e: BaseException) -> CorruptCheckpoint:
    """The one-line error for an orbax/tensorstore failure while reading ``path``."""
    return CorruptCheckpoint(f"checkpoint {path} could not be read: {_first_line(e)}")


# ---------------------------------------------------------------- what a user names


def _step_numbers(d: str) -> list[int]:
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit() and _item(os.path.join(d, n)) is not None)


def resolve(path: str) -> str:
    """The checkpoint directory that ``path`` names: a ``fit`` work directory or its
    ``checkpoints/`` (the newest intact step; damaged newer ones are skipped with a
    warning), one step directory, a :func:`save` path, or an ``average`` output."""
    d = os.path.abspath(path)
    if not os.path.isdir(d):
        raise NoCheckpoint(f"no checkpoint directory at {path}")
    for cand in (d, os.path.join(d, "checkpoint")):
        if (item := _item(cand)) is not None:
            return item
    for sub in (os.path.join(d, "checkpoints"), d):
        steps = _step_numbers(sub)
        if not steps:
            continue
        first = None
        for s in reversed(steps):
            item = _item(os.path.join(sub, str(s)))
            try:
                _verify_files(item, warn=False)
                return item
            except CorruptCheckpoint as e:
                first = first or e
                print(f"warning: skipping step {s}: {e}", file=sys.stderr)
        raise CorruptCheckpoint(f"no intact checkpoint in {sub}: {first}")
    raise NoCheckpoint(f"{path} is not a checkpoint, a checkpoints/ directory or a fit work directory")


def run_dir_of(path: str) -> str | None:
    """The run directory (holding ``summary.json`` or ``manifest.json``) of a checkpoint
    path: ``RUN/checkpoints/44`` -> ``RUN``; ``RUN`` and ``RUN/checkpoints`` -> ``RUN``;
    None when there is none (e.g. a :func:`save` path)."""
    d = os.path.abspath(path)
    if os.path.basename(d) == "default":
        d = os.path.dirname(d)
    if os.path.basename(d).isdigit() and os.path.basename(os.path.dirname(d)) == "checkpoints":
        d = os.path.dirname(d)
    if os.path.basename(d) == "checkpoints":
        d = os.path.dirname(d)
    return d if any(os.path.isfile(os.path.join(d, f)) for f in ("summary.json", "manifest.json")) else None


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def refuse_overlap(out: str, inputs: Mapping[str, str]) -> None:
    """Raise :class:`UserError` if the output directory ``out`` is, is inside, or contains
    one of ``inputs`` (``{name: path}``; real paths compared), so inputs stay read-only. For
    a step directory ``RUN/checkpoints/<step>`` its ``checkpoints`` directory counts too (a
    new directory there could be taken for a step)."""
    o = os.path.realpath(out)
    for name, p in inputs.items():
        r = os.path.realpath(p)
        guarded = [r]
        if os.path.basename(r).isdigit() and os.path.basename(os.path.dirname(r)) == "checkpoints":
            guarded.append(os.path.dirname(r))
        if any(_inside(o, g) for g in guarded):
            raise UserError(f"--out {out} is inside input {name} ({p}); inputs are read-only, choose another --out")
        if _inside(r, o):
            raise UserError(f"--out {out} contains input {name} ({p}), which writing it could destroy; choose another --out")


# ---------------------------------------------------------------- steps


class Manager:
    """Step-numbered checkpoints ``directory/<step>/`` (each written by :func:`save`),
    keeping the newest ``max_to_keep``. Saves are synchronous; one writer per directory.
    :meth:`restore` falls back past damaged steps, moving them aside."""

    def __init__(self, directory: str, max_to_keep: int | None = 2):
        self.directory = os.path.abspath(directory)
        self.max_to_keep = max_to_keep
        os.makedirs(self.directory, exist_ok=True)

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def steps(self) -> list[int]:
        """Steps on disk, ascending (complete step directories only)."""
        return _step_numbers(self.directory)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, tree: Any) -> None:
        """Write ``tree`` as ``step`` (replacing that step if present), then delete the oldest
        steps beyond ``max_to_keep`` (never ``step``)."""
        for name in os.listdir(self.directory):  # leftovers of a killed save or prune
            if _TEMP.match(name):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        save(self._path(step), tree, overwrite=True)
        if self.max_to_keep is None:
            return
        steps = self.steps()
        for s in [s for s in steps if s != step][: max(0, len(steps) - self.max_to_keep)]:
            old = f"{self._path(s)}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self._path(s), old)  # out of steps() at once, even if the removal is cut short
            shutil.rmtree(old, ignore_errors=True)

    def restore(self, target: Any, step: int | None = None) -> Any:
        """The tree of ``step`` (default: the newest intact step; a damaged newer one is
        renamed ``<step>.corrupt-<id>`` with a warning on stderr)."""
        if step is not None:
            if _item(self._path(step)) is None:
                raise NoCheckpoint(f"no checkpoint for step {step} in {self.directory}")
            return load(self._path(step), target)
        steps = self.steps()
        if not steps:
            raise NoCheckpoint(f"no checkpoint in {self.directory}")
        for s in reversed(steps):
            try:
                return load(self._path(s), target)
            except CorruptCheckpoint as e:
                moved = f"{self._path(s)}.corrupt-{uuid.uuid4().hex[:8]}"
                os.rename(self._path(s), moved)
                print(f"warning: {e}; moved it to {os.path.basename(moved)} and trying the previous step", file=sys.stderr)
        raise CorruptCheckpoint(f"no intact checkpoint in {self.directory}: all {len(steps)} steps were damaged (kept as *.corrupt-*)")

    def close(self) -> None:
        """Nothing to wait for (saves are synchronous); kept for ``with`` and old callers."""

    def __enter__(self) -> "Manager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
