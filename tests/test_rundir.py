"""Run identity: manifests, refusals that name the differing keys, locks, resumable units."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from mergejax.core import rundir
from mergejax.core.errors import ConfigMismatch, LockedError, UserError


def _manifest(**config):
    return rundir.make_manifest("demo", config, {"data": {"hash": "abc"}})


def test_same_manifest_resumes_and_different_one_names_the_keys(tmp_path):
    d = tmp_path / "run"
    with rundir.RunDir(str(d), _manifest(lr=0.1, seed=0)) as rd:
        assert not rd.resumed
        (d / "partial.txt").write_text("work")
    with rundir.RunDir(str(d), _manifest(lr=0.1, seed=0)) as rd:
        assert rd.resumed and (d / "partial.txt").exists()
    with pytest.raises(ConfigMismatch) as e:
        with rundir.RunDir(str(d), _manifest(lr=0.1, seed=5)):
            pass
    msg = str(e.value)
    assert "config.seed=0 (asked: 5)" in msg and "--overwrite" in msg and "lr" not in msg and "\n" not in msg
    assert (d / "partial.txt").exists()  # refused: nothing touched
    # inputs count too
    other = rundir.make_manifest("demo", {"lr": 0.1, "seed": 0}, {"data": {"hash": "xyz"}})
    with pytest.raises(ConfigMismatch, match=r"inputs.data.hash=abc \(asked: xyz\)"):
        with rundir.RunDir(str(d), other):
            pass
    # --overwrite replaces the old run
    with rundir.RunDir(str(d), _manifest(lr=0.1, seed=5), overwrite=True):
        assert not (d / "partial.txt").exists()
    assert rundir.read_json(str(d / "manifest.json"))["config"]["seed"] == 5


def test_a_manifest_alone_is_taken_over_by_another_config(tmp_path, capsys):
    """A run refused before it wrote anything (a bad split, a missing dataset) leaves only its
    manifest; the corrected command must not be locked out of its own --out by it."""
    d = tmp_path / "run"
    with rundir.RunDir(str(d), _manifest(split="test")):
        pass  # refused its input here: nothing written but the manifest
    with rundir.RunDir(str(d), _manifest(split="train")) as rd:
        assert not rd.resumed
        (d / "partial.txt").write_text("work")
    assert "held only the manifest of another run, which wrote nothing (config.split=test (asked: train))" in capsys.readouterr().err
    assert rundir.read_json(str(d / "manifest.json"))["config"]["split"] == "train"
    with pytest.raises(ConfigMismatch, match=r"config.split=train \(asked: test\)"):  # once it holds work: refused
        with rundir.RunDir(str(d), _manifest(split="test")):
            pass
    assert (d / "partial.txt").read_text() == "work"


def test_directory_written_by_something_else_is_refused(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigMismatch, match="not empty and has no manifest.json"):
        with rundir.RunDir(str(d), _manifest(a=1)):
            pass
    assert (d / "thesis.tex").read_text() == "precious"


def test_differences_flattens_nested_configs_and_tuples_equal_lists():
    a = {"kind": "k", "config": {"train": {"lr": 0.1, "hidden": (64, 64)}}, "inputs": {}}
    b = {"kind": "k", "config": {"train": {"lr": 0.1, "hidden": [64, 64]}}, "inputs": {}}
    assert rundir.differences(a, b) == []
    c = {"kind": "k", "config": {"train": {"lr": 0.2, "hidden": [64, 64], "new": 1}}, "inputs": {}}
    assert rundir.differences(a, c) == ["config.train.lr=0.1 (asked: 0.2)", "config.train.new=<absent> (asked: 1)"]


def test_jsonable_turns_non_finite_into_null_and_stays_valid_json(tmp_path):
    obj = {"a": float("nan"), "b": [np.float32(np.inf), 1.5, np.int64(3)], "c": (1, 2), "d": np.array([1.0, np.nan])}
    path = rundir.write_json(str(tmp_path / "x.json"), obj)
    text = open(path).read()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, 1.5, 3], "c": [1, 2], "d": [1.0, None]}


def test_second_writer_is_refused_while_the_first_lives(tmp_path):
    d = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mergejax.core import rundir; rundir.acquire_lock(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(60)", str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=rf"is being written by pid {holder.pid}") as e:
            with rundir.RunDir(str(d), _manifest(a=1)):
                pass
        assert "\n" not in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and is taken over with a warning
    with rundir.RunDir(str(d), _manifest(a=1)):
        held = rundir.read_json(str(d / ".lock"))
        assert held["pid"] == os.getpid()
    assert not (d / ".lock").exists()


def test_stale_lock_takeover_warns(tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (d / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "start": time.time()}))
    with rundir.RunDir(str(d), _manifest(a=1)):
        pass
    assert f"taking over the stale lock of dead process {int(dead.stdout)}" in capsys.readouterr().err


def test_same_process_cannot_open_a_directory_twice(tmp_path):
    with rundir.RunDir(str(tmp_path / "r"), _manifest(a=1)):
        with pytest.raises(LockedError, match="already open for writing in this process"):
            with rundir.RunDir(str(tmp_path / "r"), _manifest(a=1)):
                pass


def test_unit_runs_once_and_returns_what_is_on_disk(tmp_path):
    calls = []

    def fn(workdir):
        calls.append(workdir)
        assert os.path.isdir(workdir)
        return {"x": (1, 2), "y": math.nan}

    first = rundir.unit(str(tmp_path / "u"), "demo", {"k": 1}, fn)
    second = rundir.unit(str(tmp_path / "u"), "demo", {"k": 1}, fn)
    assert first == second == {"x": [1, 2], "y": None}  # the JSON form, both times
    assert len(calls) == 1
    with pytest.raises(ConfigMismatch, match=r"config.k=1 \(asked: 2\)"):
        rundir.unit(str(tmp_path / "u"), "demo", {"k": 2}, fn)


def test_unit_that_fails_leaves_no_result_and_reruns(tmp_path):
    def boom(workdir):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        rundir.unit(str(tmp_path / "u"), "demo", {}, boom)
    assert not (tmp_path / "u" / "result.json").exists() and not (tmp_path / "u" / ".lock").exists()
    assert rundir.unit(str(tmp_path / "u"), "demo", {}, lambda w: {"ok": 1}) == {"ok": 1}


def test_fingerprints_see_content(tmp_path, digits):
    train, test = digits
    a, b = rundir.fingerprint_split(train), rundir.fingerprint_split(test)
    assert a["size"] == 1437 and b["size"] == 360 and a["hash"] != b["hash"]
    assert rundir.fingerprint_split(train) == a
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "f").write_bytes(b"1234")
    h = rundir.fingerprint_path(str(d))["hash"]
    (d / "f").write_bytes(b"1235")
    assert rundir.fingerprint_path(str(d))["hash"] != h
    with pytest.raises(UserError, match="no checkpoint at"):
        rundir.fingerprint_path(str(tmp_path / "missing"))


def test_a_killed_but_unreaped_process_does_not_hold_its_lock():
    # a zombie: a child that exited and was not waited for yet (PID 1 may reap late after SIGKILL)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(200):
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.05)
    assert not rundir._pid_alive(child.pid)  # exited, not yet reaped
    child.wait()
    assert rundir._pid_alive(os.getpid())


def test_stale_temp_siblings_of_killed_writers_are_removed_live_ones_kept(tmp_path):
    """``mergejax average`` and ``checkpoint.save`` write ``<out>.tmp-<host>-<pid>-*`` and rename it;
    a SIGKILL in between leaves it. The next write clears those of dead writers, never a live one's."""
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    out = tmp_path / "avg"
    host = socket.gethostname()
    stale, live = tmp_path / f"avg.tmp-{host}-{dead}-0123abcd", tmp_path / f"avg.tmp-{host}-{os.getpid()}-4567ef01"
    other = tmp_path / f"avg.tmp-{host}x-{dead}-89abcdef"  # another host's name: not ours to judge
    for d in (stale, live, other):
        d.mkdir()
        (d / "checkpoint").write_text("half")
    (tmp_path / f"avg.tmp-{host}-{dead}-orbax").write_text("a file")
    fresh = rundir.temp_sibling(str(out))
    assert fresh.startswith(f"{out}.tmp-{host}-{os.getpid()}-") and fresh != rundir.temp_sibling(str(out))
    removed = rundir.remove_stale_temps(str(out))
    assert sorted(removed) == sorted([str(stale), str(tmp_path / f"avg.tmp-{host}-{dead}-orbax")])
    assert live.exists() and other.exists() and not stale.exists()
    assert rundir.remove_stale_temps(str(tmp_path / "nothing" / "here")) == []
