"""Checkpoints: round trip, atomic save, errors, integrity (checksums, damaged files, fallback past a corrupt
step, a full disk, no noise), and kill-and-resume equality (simulated and a real SIGKILL)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.core import checkpoint
from mergejax.core.errors import CorruptCheckpoint
from mergejax.core.models import make_model
from mergejax.core.optim import make_schedule
from mergejax.core.loop import fit
from mergejax.core.optim import make_optimizer
from mergejax.core.train import create_state, train_step


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
from mergejax.core import data
from mergejax.core.models import make_model
from mergejax.core.optim import make_schedule
from mergejax.core.loop import fit
from mergejax.core.optim import make_optimizer
from mergejax.core.train import create_state

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


# ---------------------------------------------------------------- integrity


def _fit_tree():
    """What ``fit`` checkpoints: step, params, batch_stats and an optax state with empty
    (None on disk) entries."""
    return _fresh_state(10).arrays()


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _kind(rel):
    """File kind: data files are named by content hash, so ``d/<hash>`` -> ``d/*``."""
    parts = rel.split(os.sep)
    return os.sep.join(parts[:-1] + ["*"]) if len(parts) > 1 and parts[-2] == "d" else rel


def _damage(full, how):
    """Zero up to 400 bytes at the middle of ``full``, or cut it to half its size."""
    n = os.path.getsize(full)
    with open(full, "r+b") as f:
        if how == "truncate":
            f.truncate(n // 2)
        else:
            k = min(400, n)
            f.seek(n // 2 - k // 2)
            f.write(b"\0" * k)


def test_every_kind_of_damaged_file_is_named_on_load(tmp_path):
    """400 zeroed bytes in, or truncation of, each file orbax 0.12.8 writes (and our
    checksums.json) raise CorruptCheckpoint with one line naming that file."""
    import shutil

    tree = _fit_tree()
    good = checkpoint.save(str(tmp_path / "good"), tree)
    files = _files(good)
    kinds = {_kind(f) for f in files}
    # what orbax writes for a small tree, plus ours
    assert {"_METADATA", "_CHECKPOINT_METADATA", "_sharding", "manifest.ocdbt", "commit_success.txt", "checksums.json",
            os.path.join("array_metadatas", "process_0"), os.path.join("d", "*"),
            os.path.join("ocdbt.process_0", "manifest.ocdbt"), os.path.join("ocdbt.process_0", "d", "*")} <= kinds, kinds
    tried = detected = 0
    for rel in files:
        for how in ("zero", "truncate"):
            victim = str(tmp_path / "victim")
            shutil.rmtree(victim, ignore_errors=True)
            shutil.copytree(good, victim)
            before = open(os.path.join(victim, rel), "rb").read()
            _damage(os.path.join(victim, rel), how)
            if open(os.path.join(victim, rel), "rb").read() == before:
                continue  # those bytes were zeros already
            tried += 1
            for target in (tree, None):
                with pytest.raises(CorruptCheckpoint) as e:
                    checkpoint.load(victim, target)
                msg = str(e.value)
                assert rel in msg and "\n" not in msg, (rel, how, msg)
            with pytest.raises(CorruptCheckpoint, match=re.escape(rel)):
                checkpoint.verify(victim)
            detected += 1
    assert tried == detected >= 2 * len(files) - 1 and len(files) >= 12, (tried, detected, len(files))
    checkpoint.verify(good)
    _assert_trees_equal(checkpoint.load(good, tree), tree)


def test_missing_file_and_altered_leaf_are_named(tmp_path):
    tree = _fit_tree()
    path = checkpoint.save(str(tmp_path / "c"), tree)
    os.remove(os.path.join(path, "_sharding"))
    with pytest.raises(CorruptCheckpoint, match=r"_sharding is missing"):
        checkpoint.load(path, tree)
    # a leaf that restores with other values than were saved (here: a forged record)
    path = checkpoint.save(str(tmp_path / "d"), tree)
    sums = json.load(open(os.path.join(path, "checksums.json")))
    key = "['params']['head']['dense']['kernel']"
    sums["leaves"][key]["sha256"] = "0" * 64
    with open(os.path.join(path, "checksums.json"), "w") as f:
        json.dump(sums, f)
    with pytest.raises(CorruptCheckpoint, match=re.escape(f"leaf {key}")):
        checkpoint.load(path, tree)


def test_checksums_record_files_and_leaves(tmp_path):
    tree = _fit_tree()
    path = checkpoint.save(str(tmp_path / "c"), tree)
    sums = json.load(open(os.path.join(path, "checksums.json")))
    assert set(sums["files"]) == set(_files(path)) - {"checksums.json"}
    for rel, rec in sums["files"].items():
        assert rec["size"] == os.path.getsize(os.path.join(path, rel))
        assert rec["sha256"] == hashlib.sha256(open(os.path.join(path, rel), "rb").read()).hexdigest()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert set(sums["leaves"]) == {jax.tree_util.keystr(p) for p, _ in leaves}
    for p, x in leaves:
        rec = sums["leaves"][jax.tree_util.keystr(p)]
        x = np.asarray(x)
        assert (tuple(rec["shape"]), rec["dtype"]) == (x.shape, str(x.dtype))
        assert rec["sha256"] == hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def test_checkpoint_without_checksums_loads_with_one_warning(tmp_path, capfd):
    tree = _tree()
    path = checkpoint.save(str(tmp_path / "old"), tree)
    os.remove(os.path.join(path, "checksums.json"))
    capfd.readouterr()
    checkpoint.verify(path)
    _assert_trees_equal(checkpoint.load(path, tree), tree)
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 2 and all("no checksums.json" in line for line in err), err


def test_nonfinite_leaves_are_refused(tmp_path):
    bad = {"params": {"a": jnp.ones(3), "b": jnp.array([1.0, jnp.nan])}, "opt": (None, jnp.zeros(2))}
    with pytest.raises(FloatingPointError, match=r"\['params'\]\['b'\] holds NaN/Inf"):
        checkpoint.save(str(tmp_path / "c"), bad)
    with pytest.raises(FloatingPointError, match=r"\['x'\]"):
        checkpoint.save(str(tmp_path / "c"), {"x": jnp.array([jnp.inf], jnp.bfloat16)})
    assert os.listdir(tmp_path) == []
    path = checkpoint.save(str(tmp_path / "c"), bad, allow_nonfinite=True)
    assert np.isnan(np.asarray(checkpoint.load(path, bad)["params"]["b"][1]))
    with checkpoint.Manager(str(tmp_path / "m")) as m:
        with pytest.raises(FloatingPointError):
            m.save(1, bad)
        assert m.steps() == []


def test_none_leaves_round_trip(tmp_path):
    tree = _fit_tree()  # its optax state holds an EmptyState, stored as None
    tree = {**tree, "extra": None, "pair": (None, jnp.ones(2))}
    path = checkpoint.save(str(tmp_path / "c"), tree)
    _assert_trees_equal(checkpoint.load(path, tree), tree)


def test_target_of_other_shapes_names_leaf(tmp_path):
    tree = _fit_tree()
    path = checkpoint.save(str(tmp_path / "c"), tree)
    other = jax.tree.map(lambda x: x, tree)
    other["params"]["head"]["dense"]["kernel"] = jnp.zeros((33, 10))
    with pytest.raises(checkpoint.CheckpointMismatch,
                       match=re.escape("leaf ['params']['head']['dense']['kernel'] of shape (32, 10), the target has (33, 10)")):
        checkpoint.load(path, other)


# ---------------------------------------------------------------- manager


def _corrupt_newest_data_file(step_dir):
    data = max((f for f in _files(step_dir) if os.sep + "d" + os.sep in os.sep + f), key=lambda f: os.path.getsize(os.path.join(step_dir, f)))
    _damage(os.path.join(step_dir, data), "truncate")
    return data


@pytest.mark.parametrize("with_checksums", [True, False])
def test_manager_falls_back_past_a_corrupt_newest_step(tmp_path, capfd, with_checksums):
    tree1 = _fit_tree()
    tree2 = jax.tree.map(lambda x: x + 1, tree1)
    d = str(tmp_path / "ckpts")
    with checkpoint.Manager(d, max_to_keep=3) as m:
        m.save(1, tree1)
        m.save(2, tree2)
        m.save(3, tree2)
    for s in ("2", "3"):
        if not with_checksums:  # written by an older mergejax: orbax's own error, then fallback
            for step in ("1", "2", "3"):
                if os.path.exists(os.path.join(d, step, "checksums.json")):
                    os.remove(os.path.join(d, step, "checksums.json"))
        rel = _corrupt_newest_data_file(os.path.join(d, s))
    capfd.readouterr()
    m = checkpoint.Manager(d, max_to_keep=3)
    assert m.steps() == [1, 2, 3]
    restored = m.restore(tree1)
    _assert_trees_equal(restored, tree1)
    assert m.steps() == [1] and m.latest_step() == 1
    moved = sorted(n for n in os.listdir(d) if ".corrupt-" in n)
    assert [n.split(".")[0] for n in moved] == ["2", "3"]  # kept for the user, no longer steps
    warnings = [line for line in capfd.readouterr().err.splitlines() if "moved it to" in line]
    assert len(warnings) == 2 and all(line.startswith("warning: checkpoint") for line in warnings), warnings
    if with_checksums:
        assert rel in warnings[0]
    # the run goes on: step 2 written again next to the kept corrupt copy
    m.save(2, tree2)
    _assert_trees_equal(m.restore(tree1), tree2)
    # nothing intact at all: one line, and the corrupt steps are kept
    _corrupt_newest_data_file(os.path.join(d, "1"))
    _corrupt_newest_data_file(os.path.join(d, "2"))
    with pytest.raises(CorruptCheckpoint, match="no intact checkpoint in") as e:
        m.restore(tree1)
    assert "\n" not in str(e.value) and m.steps() == []


def test_manager_ignores_leftovers_of_a_killed_save(tmp_path):
    import shutil

    d = tmp_path / "ckpts"
    tree = {"w": jnp.arange(4.0)}
    m = checkpoint.Manager(str(d))
    m.save(1, tree)
    # a save killed half-way: orbax's and our temp dirs, partial files, an empty step dir
    shutil.copytree(d / "1", d / "5.tmp-0123abcd")
    os.remove(d / "5.tmp-0123abcd" / "checksums.json")
    (d / "6.tmp-89abcdef.orbax-checkpoint-tmp").mkdir()
    (d / "6.tmp-89abcdef.orbax-checkpoint-tmp" / "_METADATA").write_text("{")
    (d / "7").mkdir()
    from mergejax.core.rundir import temp_sibling

    shutil.copytree(d / "1", temp_sibling(str(d / "8")))  # the name save() writes to today: <step>.tmp-<host>-<pid>-<hex>
    assert m.steps() == [1] and m.latest_step() == 1
    _assert_trees_equal(m.restore(tree), tree)
    m.save(2, {"w": jnp.ones(4)})  # the next save sweeps the leftovers
    assert sorted(os.listdir(d)) == ["1", "2", "7"]


def test_manager_max_to_keep_never_deletes_the_step_just_written(tmp_path):
    m = checkpoint.Manager(str(tmp_path), max_to_keep=2)
    for s in (1, 2, 3, 4):
        m.save(s, {"w": jnp.full(2, float(s))})
    assert m.steps() == [3, 4]
    m.save(2, {"w": jnp.full(2, 2.0)})  # an older step (e.g. after falling back): kept, the oldest other goes
    assert m.steps() == [2, 4]
    m.save(4, {"w": jnp.full(2, 5.0)})  # rewriting a step replaces it
    assert m.steps() == [2, 4]
    np.testing.assert_array_equal(m.restore({"w": jnp.zeros(2)})["w"], [5.0, 5.0])
    everything = checkpoint.Manager(str(tmp_path / "all"), max_to_keep=None)
    for s in range(1, 5):
        everything.save(s, {"w": jnp.zeros(1)})
    assert everything.steps() == [1, 2, 3, 4]
    assert not [n for n in os.listdir(tmp_path) if not n.isdigit() and n != "all"]


def test_full_disk_leaves_no_partial_step(tmp_path, monkeypatch):
    """ENOSPC in the middle of a save: an OSError, no new step, no temp files, the previous
    step intact. (Simulated twice: while orbax writes, and while writing checksums.json.)"""
    import errno

    import orbax.checkpoint as ocp

    d = tmp_path / "ckpts"
    m = checkpoint.Manager(str(d))
    one = {"w": jnp.arange(6.0)}
    m.save(1, one)
    real_save = ocp.Checkpointer.save

    def orbax_fails(self, directory, *a, **k):
        os.makedirs(directory)
        with open(os.path.join(directory, "_METADATA"), "w") as f:
            f.write('{"tree_metadata": {')
        raise ValueError(f"DATA_LOSS: Error writing \"w/0\" to local file \"{directory}/d/x\": "
                         "No space left on device [os_error_code='28']")

    def checksums_fail(path, obj):
        with open(path, "w") as f:
            f.write('{"files": ')
        raise OSError(errno.ENOSPC, "No space left on device", path)

    for patch in (("orbax", orbax_fails), ("json", checksums_fail)):
        with monkeypatch.context() as mp:
            if patch[0] == "orbax":
                mp.setattr(ocp.Checkpointer, "save", patch[1])
            else:
                mp.setattr(checkpoint, "write_json", patch[1])
            with pytest.raises(OSError) as e:
                m.save(2, {"w": jnp.ones(6)})
        assert e.value.errno == errno.ENOSPC, e.value
        assert sorted(os.listdir(d)) == ["1"] and m.steps() == [1]
        _assert_trees_equal(m.restore(one), one)
    assert ocp.Checkpointer.save is real_save


_FULL_DISK = """
import json, os, resource, signal, sys
import numpy as np
from mergejax.core import checkpoint
checkpoint.quiet_logging()
m = checkpoint.Manager(sys.argv[1])
m.save(1, {"w": np.ones(4, np.float32)})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4000, resource.RLIM_INFINITY))  # files past 4 kB fail to write
try:
    m.save(2, {"w": np.random.default_rng(0).normal(size=(100, 100)).astype(np.float32)})
    err = None
except OSError as e:
    err = [type(e).__name__, e.errno, str(e)]
print(json.dumps({"err": err, "steps": m.steps(), "w": m.restore({"w": np.zeros(4, np.float32)})["w"].tolist()}))
"""


def test_real_write_failure_leaves_no_partial_step(tmp_path, run_python):
    """A real failed write inside tensorstore (a per-file size limit standing in for a full
    disk, which needs no root): OSError, nothing half-written counts as a step, no noise."""
    d = tmp_path / "ckpts"
    proc = run_python(_FULL_DISK.replace("sys.argv[1]", repr(str(d))), env={"JAX_PLATFORMS": "cpu"})
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["err"] is not None and out["err"][1] == 27 and "could not write checkpoint" in out["err"][2], out
    assert out["steps"] == [1] and out["w"] == [1.0] * 4
    assert sorted(os.listdir(d)) == ["1"]
    assert proc.stderr == "", proc.stderr


_QUIET = """
import os, shutil, sys, time
import numpy as np
from mergejax.core import checkpoint
from mergejax.core.errors import CorruptCheckpoint
root = sys.argv[1]
tree = {"w": np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32), "b": np.ones(8, np.float32)}
path = checkpoint.save(os.path.join(root, "c"), tree)
checkpoint.load(path, tree)
with checkpoint.Manager(os.path.join(root, "m")) as m:
    m.save(1, tree)
    m.restore(tree)
if sys.argv[2] == "damaged":
    checkpoint.quiet_logging()
    os.remove(os.path.join(path, "checksums.json"))  # as written by an older version: orbax reads the damage
    data = max((os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if os.path.basename(d) == "d"), key=os.path.getsize)
    open(data, "r+b").truncate(os.path.getsize(data) // 2)
    for _ in range(5):
        try:
            checkpoint.load(path, tree)
        except CorruptCheckpoint as e:
            print(e)
    time.sleep(0.5)  # late tensorstore callbacks would print here
"""


@pytest.mark.parametrize("case", ["clean", "damaged"])
def test_save_and_load_print_nothing(tmp_path, run_python, case):
    proc = run_python(_QUIET.replace("sys.argv[1]", repr(str(tmp_path))).replace("sys.argv[2]", repr(case)),
                      env={"JAX_PLATFORMS": "cpu"})
    if case == "clean":
        assert proc.stderr == "", proc.stderr
    else:
        assert len(proc.stdout.strip().splitlines()) == 5
        lines = proc.stderr.splitlines()
        assert len(lines) == 5 and all("no checksums.json" in line for line in lines), proc.stderr[-3000:]


def test_fit_resumes_past_a_corrupt_newest_checkpoint(digits, tmp_path, capfd):
    """A truncated newest checkpoint no longer blocks resume: fit falls back to the previous
    step and ends bit-identical to an uninterrupted run."""
    train, _ = digits
    n = 12
    initial = _fresh_state(n)
    fresh = lambda: initial.replace_arrays(jax.tree.map(jnp.array, initial.arrays()))  # noqa: E731
    kw = dict(num_steps=n, batch_size=32, seed=3, checkpoint_every=4, log_every=4, progress=False,
              step_fn=jax.jit(train_step, donate_argnums=0))
    reference, _ = fit(fresh(), train, **kw)

    class Stop(Exception):
        pass

    def stop(step, state):
        if step == 9:
            raise Stop

    workdir = str(tmp_path / "run")
    with pytest.raises(Stop):
        fit(fresh(), train, workdir=workdir, callbacks=[stop], **kw)
    ckpts = os.path.join(workdir, "checkpoints")
    rel = _corrupt_newest_data_file(os.path.join(ckpts, "8"))
    capfd.readouterr()
    resumed_from = []
    resumed, _ = fit(fresh(), train, workdir=workdir, callbacks=[lambda s, st: resumed_from.append(s)], **kw)
    assert resumed_from[0] == 5
    assert rel in capfd.readouterr().err
    _assert_trees_equal(resumed.arrays(), reference.arrays())
    assert any(n.startswith("8.corrupt-") for n in os.listdir(ckpts))
