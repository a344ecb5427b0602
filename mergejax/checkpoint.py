"""Orbax checkpoints of plain pytrees: atomic single saves and a resumable step manager."""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp


def save(path: str, tree: Any, *, overwrite: bool = False) -> str:
    """Write ``tree`` to ``path`` atomically: into a temporary sibling, then rename.

    An existing ``path`` is never touched unless ``overwrite``; even then it is replaced
    only after the new checkpoint is complete.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"checkpoint {path} already exists (pass overwrite=True to replace it)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp, tree)
        ckptr.wait_until_finished()
    replace_dir(tmp, path)
    return path


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


def load(path: str, target: Any | None = None) -> Any:
    """Read a checkpoint written by :func:`save` or :class:`Manager`.

    ``target`` (arrays or ``jax.ShapeDtypeStruct``) fixes structure, shapes and dtypes;
    without it the stored tree is returned as saved.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    abstract = None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, abstract)


class Manager:
    """Step-numbered checkpoints in ``directory`` (``directory/<step>/``), keeping the last
    ``max_to_keep``. Saves are asynchronous; call :meth:`close` (or use ``with``) at the end."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._mngr = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, tree: Any) -> None:
        self._mngr.save(step, args=ocp.args.StandardSave(tree))

    def restore(self, target: Any, step: int | None = None) -> Any:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self._mngr.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return self._mngr.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
