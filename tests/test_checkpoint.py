"""Checkpoints: round trip, atomic save, errors, and kill-and-resume equality (simulated and a real SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import checkpoint
from mergejax.models import make_model
from mergejax.schedules import make_schedule
from mergejax.train import create_state, fit, make_optimizer, train_step


def _tree():
    return {
        "params": {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4), "bias": jnp.array([0.5, -1.5, 2.5, 1e-8])}},
        "step": jnp.array(7, jnp.int32),
        "stats": [jnp.ones((2,), jnp.bfloat16), jnp.array([1, 2, 3], jnp.int8)],
    }


def _assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb, f"structures differ:\n{ta}\n{tb}"
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, f"{jax.tree_util.keystr(path)}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_round_trip_with_and_without_target(tmp_path):
    tree = _tree()
    path = checkpoint.save(str(tmp_path / "ckpt"), tree)
    assert path == str(tmp_path / "ckpt")
    _assert_trees_equal(checkpoint.load(path, target=tree), tree)
    # target may be abstract shapes only
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    _assert_trees_equal(checkpoint.load(path, target=abstract), tree)
    # without a target the arrays come back as saved (containers may differ: compare leaves by path)
    loose = checkpoint.load(path)
    np.testing.assert_array_equal(np.asarray(loose["params"]["dense"]["kernel"]), np.asarray(tree["params"]["dense"]["kernel"]))
    assert int(loose["step"]) == 7
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary siblings left


def test_save_never_clobbers_without_overwrite(tmp_path):
    path = str(tmp_path / "ckpt")
    old = {"w": jnp.zeros(3)}
    checkpoint.save(path, old)
    with pytest.raises(FileExistsError, match="already exists .*overwrite=True"):
        checkpoint.save(path, {"w": jnp.ones(3)})
    _assert_trees_equal(checkpoint.load(path, target=old), old)
    new = {"w": jnp.full(3, 2.0)}
    checkpoint.save(path, new, overwrite=True)
    _assert_trees_equal(checkpoint.load(path, target=new), new)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_failed_save_leaves_existing_checkpoint_intact(tmp_path):
    path = str(tmp_path / "ckpt")
    old = {"w": jnp.arange(3.0)}
    checkpoint.save(path, old)

    class NotAnArray:
        pass

    with pytest.raises(Exception):
        checkpoint.save(path, {"w": NotAnArray()}, overwrite=True)
    _assert_trees_equal(checkpoint.load(path, target=old), old)


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nowhere"):
        checkpoint.load(str(tmp_path / "nowhere"))
    with checkpoint.Manager(str(tmp_path / "mgr")) as m:
        assert m.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            m.restore({"w": jnp.zeros(2)})


def test_manager_keeps_latest_and_restores_by_step(tmp_path):
    with checkpoint.Manager(str(tmp_path), max_to_keep=2) as m:
        for s in (1, 2, 3):
            m.save(s, {"w": jnp.full(2, float(s))})
    with checkpoint.Manager(str(tmp_path), max_to_keep=2) as m:
        assert m.latest_step() == 3
        assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [2, 3]
        np.testing.assert_array_equal(m.restore({"w": jnp.zeros(2)})["w"], [3.0, 3.0])
        np.testing.assert_array_equal(m.restore({"w": jnp.zeros(2)}, step=2)["w"], [2.0, 2.0])


# ---------------------------------------------------------------- kill and resume


def _fresh_state(num_steps):
    # BatchNorm statistics, momentum and a schedule: everything a resume must restore
    lr_fn = make_schedule("cosine", 0.05, num_steps)
    tx = make_optimizer("sgd", lr_fn, momentum=0.9, weight_decay=5e-4)
    return create_state(make_model("cnn", 10, width=0.25), jax.random.key(1), (1, 8, 8, 1), tx, lr_fn=lr_fn)


class _Killed(Exception):
    pass


def test_resume_after_simulated_kill_is_bit_identical(digits, tmp_path):
    train, _ = digits
    n, kill_at = 15, 10
    # one initial state, copied per run (fit donates its input); one compiled step shared by the runs
    initial = _fresh_state(n)
    fresh = lambda: initial.replace_arrays(jax.tree.map(jnp.array, initial.arrays()))  # noqa: E731
    kw = dict(num_steps=n, batch_size=32, seed=3, checkpoint_every=4, log_every=5, progress=False,
              step_fn=jax.jit(train_step, donate_argnums=0))
    reference, _ = fit(fresh(), train, **kw)

    def kill(step, state):
        if step == kill_at:
            raise _Killed

    workdir = str(tmp_path / "run")
    with pytest.raises(_Killed):
        fit(fresh(), train, workdir=workdir, callbacks=[kill], **kw)
    with checkpoint.Manager(os.path.join(workdir, "checkpoints")) as m:
        assert m.latest_step() == 8
    resumed_from = []
    resumed, _ = fit(fresh(), train, workdir=workdir, callbacks=[lambda s, st: resumed_from.append(s)], **kw)
    assert resumed_from[0] == 9  # continued after the step-8 checkpoint, not from scratch
    _assert_trees_equal(resumed.arrays(), reference.arrays())
    # a finished run restarted does nothing and returns the final state
    again, history = fit(fresh(), train, workdir=workdir, **kw)
    assert history == []
    _assert_trees_equal(again.arrays(), reference.arrays())


_CHILD = """
import sys, time
import jax, numpy as np
from mergejax import data
from mergejax.models import make_model
from mergejax.schedules import make_schedule
from mergejax.train import create_state, fit, make_optimizer

workdir, out, sleep = sys.argv[1], sys.argv[2], float(sys.argv[3])
n = 40
lr_fn = make_schedule("cosine", 0.05, n)
tx = make_optimizer("sgd", lr_fn, momentum=0.9, weight_decay=5e-4)
state = create_state(make_model("cnn", 10, width=0.25), jax.random.key(1), (1, 8, 8, 1), tx, lr_fn=lr_fn)
state, _ = fit(state, data.load("digits", "train"), num_steps=n, batch_size=32, seed=5, checkpoint_every=5,
               workdir=None if workdir == "-" else workdir, callbacks=[lambda s, st: time.sleep(sleep)], progress=False)
leaves = jax.tree_util.tree_flatten_with_path(state.arrays())[0]
np.savez(out, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
"""


def _child(*args):
    return [sys.executable, "-c", textwrap.dedent(_CHILD), *map(str, args)]


@pytest.mark.slow  # three fresh training processes: ~40 s idle, minutes on a busy 2-core machine
def test_resume_after_real_sigkill_matches_uninterrupted_run(tmp_path):
    """Start a training process, SIGKILL it once its first checkpoint is on disk (possibly mid-way through
    writing the next one), start it again with the same arguments: the final state equals an
    uninterrupted run bit for bit."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    workdir = tmp_path / "run"
    ckpt_dir = workdir / "checkpoints"
    # the uninterrupted reference runs alongside (the victim mostly sleeps in its callback)
    reference = subprocess.Popen(_child("-", tmp_path / "reference.npz", 0.0), env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = subprocess.Popen(_child(workdir, tmp_path / "killed.npz", 0.1), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (ckpt_dir.exists() and any(d.isdigit() for d in os.listdir(ckpt_dir))):
            assert proc.poll() is None, f"training process exited early:\n{proc.stderr.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared within 240 s"
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    except BaseException:
        reference.kill()
        reference.wait()
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps_on_disk = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    assert steps_on_disk and steps_on_disk[-1] < 40, steps_on_disk
    assert not (tmp_path / "killed.npz").exists()

    subprocess.run(_child(workdir, tmp_path / "resumed.npz", 0.0), env=env, check=True, capture_output=True, timeout=300)
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err.decode()[-3000:]
    with np.load(tmp_path / "resumed.npz") as a, np.load(tmp_path / "reference.npz") as b:
        assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert int(a["['step']"]) == 40
