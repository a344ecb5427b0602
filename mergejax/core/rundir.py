"""Directories that know what produced them: a manifest, a lock, and resumable units.

Every directory a run writes (a ``fit`` workdir, an experiment, each of its units, a merge
or average output) holds ``manifest.json``: what it is (``kind``), the fully resolved
``config``, fingerprints of its ``inputs`` (datasets, checkpoints it starts from) and the
library versions. Opening the directory again with the same manifest resumes it (or returns
the finished result); another manifest is refused with one line naming the differing keys.
A ``.lock`` file (pid, host, start time) keeps a second writer out.

    with RunDir("results/x/units/seed0", manifest) as rd:
        result = rd.result() or rd.finish(compute(rd.path))
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
import uuid
from typing import Any, Callable, Mapping

from mergejax.core.errors import ConfigMismatch, LockedError, UserError

MANIFEST = "manifest.json"
RESULT = "result.json"
LOCK = ".lock"
COMPARED = ("kind", "config", "inputs")  # what must match to resume; versions only warn


# ---------------------------------------------------------------- JSON that stays valid


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON: tuples -> lists, numpy scalars/arrays -> Python, NaN/Inf -> None."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist") and hasattr(x, "dtype"):  # numpy / jax scalars and arrays
        return jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def write_json(path: str, obj: Any) -> str:
    """Atomically write ``obj`` (through :func:`jsonable`, so always valid JSON) to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(jsonable(obj), f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def temp_sibling(path: str) -> str:
    """A fresh name beside ``path`` to write into and then rename onto it:
    ``<path>.tmp-<host>-<pid>-<8 hex>``. A writer killed half-way leaves it behind; the name says
    whose it was, so :func:`remove_stale_temps` can clear it once that process is gone."""
    return f"{os.path.abspath(path)}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_temps(path: str) -> list[str]:
    """Delete the :func:`temp_sibling` leftovers of ``path`` written on this host by processes that
    are no longer running (a killed write); returns what it removed. Live writers' are kept."""
    parent, base = os.path.split(os.path.abspath(path))
    prefix, removed = f"{base}.tmp-{socket.gethostname()}-", []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
        pid = name[len(prefix):].split("-")[0] if name.startswith(prefix) else ""
        if pid.isdigit() and not _pid_alive(int(pid)):
            stale = os.path.join(parent, name)
            shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)
            removed.append(stale)
    return removed


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- fingerprints


def versions() -> dict:
    """Versions of mergejax and the libraries whose numerics a result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mergejax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def fingerprint_split(split) -> dict:
    """Name, size, shape and a content hash (blake2b of images and labels) of a data split."""
    h = hashlib.blake2b(digest_size=16)
    h.update(memoryview(split.images).cast("B"))
    h.update(memoryview(split.labels).cast("B"))
    return {"name": split.name, "size": len(split), "image_shape": list(split.images.shape[1:]),
            "num_classes": split.num_classes, "hash": h.hexdigest()}


def fingerprint_path(path: str) -> dict:
    """Content hash of a checkpoint directory (or file): its checksum file if it has one,
    else every file's bytes. Raises :class:`UserError` for a missing path."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}")
    h = hashlib.blake2b(digest_size=16)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    checksums = [f for f in files if os.path.basename(f) == "checksums.json"]
    for f in checksums or files:
        h.update(os.path.relpath(f, path).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return {"path": path, "hash": h.hexdigest()}


# ---------------------------------------------------------------- manifest comparison


def _flatten(tree: Any, prefix: str = "") -> dict:
    if isinstance(tree, Mapping) and tree:
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def differences(stored: Mapping, asked: Mapping, keys=COMPARED) -> list[str]:
    """Dotted keys under ``keys`` whose values differ between two manifests, as
    ``key=stored (asked: new)`` strings."""
    a = _flatten({k: jsonable(stored.get(k)) for k in keys})
    b = _flatten({k: jsonable(asked.get(k)) for k in keys})
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}={_short(a.get(key, '<absent>'))} (asked: {_short(b.get(key, '<absent>'))})")
    return out


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= n else s[: n - 3] + "..."


# ---------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def acquire_lock(path: str) -> str:
    """Create ``path/.lock`` (pid, host, start time, command). A lock of a live process
    raises :class:`LockedError`; a dead process's lock on this host is taken over with a
    warning on stderr. Returns the lock file's path."""
    os.makedirs(path, exist_ok=True)
    lock = os.path.join(path, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": time.time(), "argv": sys.argv}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = read_json(lock)
            except (OSError, ValueError):  # being written this instant, or a torn write
                time.sleep(0.2)
                try:
                    held = read_json(lock)
                except (OSError, ValueError):
                    held = {"pid": -1, "host": me["host"]}
            if held.get("host") != me["host"]:
                raise LockedError(f"{path} is locked by pid {held.get('pid')} on host {held.get('host')}; "
                                  f"if that process is gone, delete {lock}") from None
            if held.get("pid") == me["pid"]:
                raise LockedError(f"{path} is already open for writing in this process") from None
            if held.get("pid", -1) > 0 and _pid_alive(held["pid"]):
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("start", 0)))
                raise LockedError(f"{path} is being written by pid {held['pid']} (started {started}); "
                                  f"wait for it or use another --out") from None
            print(f"warning: taking over the stale lock of dead process {held.get('pid')} in {path}", file=sys.stderr)
            try:
                os.remove(lock)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise LockedError(f"could not take the lock {lock}")


def release_lock(lock: str) -> None:
    try:
        if read_json(lock).get("pid") == os.getpid():
            os.remove(lock)
    except (OSError, ValueError):
        pass


# ---------------------------------------------------------------- run directory


def make_manifest(kind: str, config: Any, inputs: Mapping | None = None) -> dict:
    """``{'kind', 'config', 'inputs', 'versions'}`` with everything as plain JSON."""
    return {"kind": kind, "config": jsonable(config), "inputs": jsonable(dict(inputs or {})), "versions": versions()}


class RunDir:
    """One directory, one manifest, one writer. Use as a context manager.

    On entry: take the lock; if ``manifest.json`` exists and agrees with ``manifest`` on
    ``kind``/``config``/``inputs``, resume; if it differs, raise :class:`ConfigMismatch`
    (or, with ``overwrite``, empty the directory and start afresh); a directory holding only
    another run's manifest (that run stopped before writing anything, e.g. refused its input) is
    taken over with a warning, as nothing in it can be lost. A directory with files but no
    manifest is refused too, so nothing written by something else is touched.
    """

    def __init__(self, path: str, manifest: Mapping, *, overwrite: bool = False):
        self.path = os.path.abspath(path)
        self.manifest = dict(manifest)
        self.overwrite = overwrite
        self._lock: str | None = None
        self.resumed = False

    def __enter__(self) -> "RunDir":
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"{self.path} exists and is not a directory")
        self._lock = acquire_lock(self.path)
        try:
            self._check_manifest()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._lock is not None:
            release_lock(self._lock)
            self._lock = None

    def _check_manifest(self) -> None:
        mpath = os.path.join(self.path, MANIFEST)
        others = [f for f in os.listdir(self.path) if f not in (LOCK, MANIFEST)]
        if os.path.exists(mpath):
            try:
                stored = read_json(mpath)
            except ValueError:
                stored = {"kind": "<unreadable manifest>"}
            diff = differences(stored, self.manifest)
            if not diff and not self.overwrite:
                self.resumed = bool(others)
                old = stored.get("versions") or {}
                changed = [f"{k} {old.get(k)} -> {v}" for k, v in self.manifest.get("versions", {}).items() if old.get(k) != v]
                if changed and others:
                    print(f"warning: resuming {self.path} written with other versions: {', '.join(changed)}", file=sys.stderr)
                return
            if diff and not self.overwrite and not others:  # only the manifest of a run refused before it wrote anything
                print(f"warning: {self.path} held only the manifest of another run, which wrote nothing "
                      f"({'; '.join(diff[:2])}); starting this run there", file=sys.stderr)
            elif diff and not self.overwrite:
                shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
                raise ConfigMismatch(f"{self.path} holds a different run: {shown}. "
                                     f"Use another --out, or --overwrite to replace it")
        elif others and not self.overwrite:
            raise ConfigMismatch(f"{self.path} is not empty and has no {MANIFEST} (not written by this run); "
                                 f"use another --out, or --overwrite to replace it")
        for f in others:
            full = os.path.join(self.path, f)
            shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.remove(full)
        write_json(mpath, self.manifest)

    def result(self) -> dict | None:
        """The finished result (``result.json``), or None while unfinished."""
        path = os.path.join(self.path, RESULT)
        if not os.path.exists(path):
            return None
        try:
            return read_json(path)
        except ValueError:  # torn by a crash of an older writer: recompute
            return None

    def finish(self, result: Mapping) -> dict:
        """Write ``result.json`` atomically and return it as read back from disk."""
        write_json(os.path.join(self.path, RESULT), result)
        return self.result()


def unit(path: str, kind: str, config: Any, fn: Callable[[str], Mapping], *, inputs: Mapping | None = None,
         overwrite: bool = False) -> dict:
    """A resumable unit of work: ``fn(path)`` runs once and its JSON result is kept in
    ``path/result.json``; calling again with the same ``(kind, config, inputs)`` returns the
    stored result without running ``fn``. ``fn`` may keep checkpoints under ``path`` to
    resume itself after a kill. The returned dict is always what is on disk."""
    with RunDir(path, make_manifest(kind, config, inputs), overwrite=overwrite) as rd:
        done = rd.result()
        if done is not None:
            return done
        return rd.finish(fn(rd.path))
