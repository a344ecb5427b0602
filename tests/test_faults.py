"""Fault injection: real SIGKILLs at random moments, corrupted and truncated checkpoints,
concurrent writers, divergence. Every case ends with the uninterrupted result or a one-line
refusal, and nothing written before is lost.

Default run: a few kills of ``mergejax train`` and the other faults. ``pytest -m slow
tests/test_faults.py`` adds many more kills, including of ``experiments/reproduce.py``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


TRAIN = ["--set", "model=mlp", "--set", "model_kwargs={'hidden': (32,)}", "--set", "steps=600",
         "--set", "checkpoint_every=7", "--set", "log_every=5", "--quiet"]


def _cmd():
    script = Path(sys.executable).parent / "mergejax"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mergejax.cli"]


def _env(tmp_path):
    return {**os.environ, "MERGEJAX_COMPILATION_CACHE": str(tmp_path / "xla")}


def _final_arrays(out):
    from mergejax.core import checkpoint

    return checkpoint.load(os.path.join(out, "checkpoints", "600"))


def _assert_same_run(a_dir, b_dir):
    import jax

    a, b = _final_arrays(a_dir), _final_arrays(b_dir)
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    sa, sb = (json.load(open(os.path.join(d, "summary.json"))) for d in (a_dir, b_dir))
    assert (sa["test_accuracy"], sa["test_loss"]) == (sb["test_accuracy"], sb["test_loss"])
    steps = [json.loads(l)["step"] for l in open(os.path.join(b_dir, "metrics.jsonl")) if '"train"' in l]
    assert steps == list(range(5, 601, 5))  # no repeated or missing records after the kills


def _newest_step(out):
    try:
        return max((int(s) for s in os.listdir(os.path.join(out, "checkpoints")) if s.isdigit()), default=0)
    except FileNotFoundError:
        return 0


def _kill_and_resume(tmp_path, out, extra_delays, args=("train", *TRAIN), checkpoints=None):
    """Run ``mergejax *args --out out``; each time it has written a new checkpoint (under
    ``checkpoints``, default ``out``), SIGKILL it after a further random delay (landing in a step,
    a checkpoint write, a log write...); then let it finish. Returns how many kills hit a live process."""
    hits, checkpoints = 0, checkpoints or out
    for extra in extra_delays:
        seen = _newest_step(checkpoints)
        proc = subprocess.Popen([*_cmd(), *args, "--out", out], env=_env(tmp_path),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while proc.poll() is None and _newest_step(checkpoints) <= seen and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(extra)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            hits += 1
        _, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]
    done = subprocess.run([*_cmd(), *args, "--out", out], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return hits


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    out = str(tmp / "ref")
    proc = subprocess.run([*_cmd(), "train", *TRAIN, "--out", out], env=_env(tmp), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_sigkill_at_random_moments_resumes_to_the_uninterrupted_result(tmp_path, reference_run):
    rng = random.Random(0)
    delays = [rng.uniform(0.0, 0.4) for _ in range(4)]
    hits = _kill_and_resume(tmp_path, str(tmp_path / "run"), delays)
    assert hits >= 3  # the kills landed while it ran
    _assert_same_run(reference_run, str(tmp_path / "run"))


@pytest.mark.slow
def test_many_sigkills(tmp_path, reference_run):
    rng = random.Random(1)
    delays = [rng.uniform(0.0, 0.6) for _ in range(16)]
    hits = _kill_and_resume(tmp_path, str(tmp_path / "run"), delays)
    print(f"kills that hit a live process: {hits}/{len(delays)}")
    _assert_same_run(reference_run, str(tmp_path / "run"))


def _largest_file(step_dir):
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs if f != "checksums.json"]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["zero", "truncate"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_step(tmp_path, reference_run, damage):
    out = str(tmp_path / "run")
    shutil.copytree(reference_run, out)  # same manifest: the same run, finished
    ckpts = os.path.join(out, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit())
    assert steps[-1] == 600
    victim = _largest_file(os.path.join(ckpts, "600"))
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        if damage == "zero":
            f.seek(size // 2)
            f.write(b"\0" * min(400, size - size // 2))
        else:
            f.truncate(size // 2)
    proc = subprocess.run([*_cmd(), "train", *TRAIN, "--out", out], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warn = [l for l in proc.stderr.splitlines() if os.path.basename(victim) in l]
    assert warn, proc.stderr  # the damaged file is named
    # the damaged step was set aside (not deleted), the run redone from the previous step
    assert any(s.startswith("600.corrupt") for s in os.listdir(ckpts))
    _assert_same_run(reference_run, out)


def test_concurrent_writer_fails_at_once_with_one_line(tmp_path):
    out = str(tmp_path / "run")
    args = [*_cmd(), "train", *TRAIN[:-3], "--set", "steps=3000", "--set", "log_every=500", "--quiet", "--out", out]
    first = subprocess.Popen(args, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):  # wait until the first one holds the lock
            if os.path.exists(os.path.join(out, ".lock")):
                break
            time.sleep(0.05)
        t0 = time.perf_counter()
        second = subprocess.run(args, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
        took = time.perf_counter() - t0
        assert second.returncode == 2
        lines = [l for l in second.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and f"is being written by pid {first.pid}" in lines[0], second.stderr
        assert first.poll() is None, "the first writer must not be disturbed"
        print(f"second writer refused in {took:.1f} s")
    finally:
        first.kill()
        first.wait()


def test_divergence_stops_in_one_line_and_leaves_only_finite_checkpoints(tmp_path):
    out = str(tmp_path / "run")
    args = [*_cmd(), "train", "--set", "model=mlp", "--set", "steps=60", "--set", "lr=1e6", "--set", "checkpoint_every=5",
            "--set", "log_every=20", "--set", "weight_decay=0.0", "--quiet", "--out", out]
    proc = subprocess.run(args, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "non-finite" in lines[0] and "at step" in lines[0], proc.stderr
    from mergejax.core import checkpoint
    from mergejax.core.loop import all_finite

    ckpts = os.path.join(out, "checkpoints")
    for step in (s for s in os.listdir(ckpts) if s.isdigit()):
        assert all_finite(checkpoint.load(os.path.join(ckpts, step))), step
    records = [json.loads(l, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
               for l in open(os.path.join(out, "metrics.jsonl"))]
    assert all(r["step"] <= 60 for r in records)


# ---------------------------------------------------------------- merge and average killed


def _teachers(tmp_path):
    """Two small MLP teachers written by ``mergejax train`` (run directories with checkpoints)."""
    outs = []
    for seed in (0, 1):
        out = str(tmp_path / f"teacher{seed}")
        proc = subprocess.run([*_cmd(), "train", "--set", "model=mlp", "--set", "model_kwargs={'hidden': (32,)}",
                               "--set", "steps=40", "--set", f"seed={seed}", "--quiet", "--out", out],
                              env=_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(out)
    return outs


def _kill_at_moments(tmp_path, args, moments):
    hits = 0
    for delay in moments:
        proc = subprocess.Popen([*_cmd(), *args], env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            hits += 1
        _, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]
    done = subprocess.run([*_cmd(), *args], env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return hits


def _tree_equal(a_path, b_path):
    import jax

    from mergejax.core import checkpoint

    a, b = checkpoint.load(a_path), checkpoint.load(b_path)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_average_killed_at_random_moments_gives_the_uninterrupted_output(tmp_path):
    a, b = _teachers(tmp_path)
    snapshot = {p: sorted(os.walk(p)) for p in (a, b)}
    ref = str(tmp_path / "avg_ref")
    assert subprocess.run([*_cmd(), "average", a, b, "--weights", "3", "1", "--out", ref], env=_env(tmp_path),
                          capture_output=True, timeout=300).returncode == 0
    out = str(tmp_path / "avg")
    rng = random.Random(2)
    hits = _kill_at_moments(tmp_path, ["average", a, b, "--weights", "3", "1", "--out", out],
                            [rng.uniform(0.3, 1.8) for _ in range(3)])
    print(f"average: kills that hit a live process {hits}/3")
    _tree_equal(os.path.join(ref, "checkpoint"), os.path.join(out, "checkpoint"))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no half-written output left beside it
    assert {p: sorted(os.walk(p)) for p in (a, b)} == snapshot  # inputs untouched


@pytest.mark.slow
def test_merge_killed_at_random_moments_gives_the_uninterrupted_student(tmp_path):
    a, b = _teachers(tmp_path)
    args = ["--quiet", "--set", "gate_epochs=6.0", "--set", "finetune_epochs=6.0", "--set", "checkpoint_every=7"]
    ref = str(tmp_path / "merge_ref")
    t0 = time.monotonic()
    proc = subprocess.run([*_cmd(), "merge", a, b, "--out", ref, *args], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = str(tmp_path / "merged")
    rng = random.Random(3)  # each attempt resumes, so kill early enough to land inside the work left
    hits = _kill_at_moments(tmp_path, ["merge", a, b, "--out", out, *args], [rng.uniform(0.3, 0.6) * took for _ in range(4)])
    print(f"merge: kills that hit a live process {hits}/4")
    _tree_equal(os.path.join(ref, "student"), os.path.join(out, "student"))
    sa, sb = (json.load(open(os.path.join(d, "summary.json"))) for d in (ref, out))
    for key in ("big_student_after_gates", "after_compression", "after_finetune"):
        assert sa[key] == sb[key], key


@pytest.mark.slow
def test_vmapped_seeds_killed_at_random_moments_give_the_uninterrupted_models(tmp_path):
    """``mergejax train --set 'seeds=(0,1)' --set models_per_program=2``: real SIGKILLs, then a re-run,
    end with every model's arrays and each seed's summary equal to an uninterrupted run."""
    args = ["train", *TRAIN[:-1], "--set", "seeds=(0,1)", "--set", "models_per_program=2", "--quiet"]
    ref = str(tmp_path / "ref")
    proc = subprocess.run([*_cmd(), *args, "--out", ref], env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out, rng = str(tmp_path / "run"), random.Random(2)
    hits = _kill_and_resume(tmp_path, out, [rng.uniform(0.0, 0.4) for _ in range(4)], args, os.path.join(out, "seeds_0_1"))
    assert hits >= 2, hits
    _tree_equal(os.path.join(ref, "seeds_0_1", "checkpoints", "600"), os.path.join(out, "seeds_0_1", "checkpoints", "600"))
    sa, sb = (json.load(open(os.path.join(d, "summary.json"))) for d in (ref, out))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]  # noqa: E731
    assert strip(sa["per_seed"]) == strip(sb["per_seed"]) and [r["seed"] for r in sa["per_seed"]] == [0, 1]
    steps = [json.loads(l)["step"] for l in open(os.path.join(out, "seeds_0_1", "metrics.jsonl"))
             if '"train"' in l and '"model": 0' in l]
    assert steps == list(range(5, 601, 5))  # no repeated or missing records after the kills
