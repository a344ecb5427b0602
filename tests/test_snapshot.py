"""Snapshot collection at schedule boundaries and ensemble prediction vs a float64 numpy reference."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.core import checkpoint
from mergejax.core import data
from mergejax.core import optim as schedules
from mergejax.core import trees
from mergejax.core.models import make_model
from mergejax.ensembles.snapshot import (
    SnapshotCollector,
    ensemble_curve,
    ensemble_sums,
    evaluate_ensemble,
    curve_summary,
    final_snapshot,
    fit_with_snapshots,
    load_snapshots,
    stack_snapshots,
    vote_predictions,
)
from mergejax.core.loop import fit
from mergejax.core.optim import make_optimizer
from mergejax.core.train import create_state


def _np_ensemble(logits, labels, mask):
    """float64 reference: per m = 1..M, the mean softmax of the LAST m members (M, N, K)."""
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    M = len(probs)
    out = {"accuracy": [], "nll": [], "vote_accuracy": []}
    w = mask / mask.sum()
    for m in range(1, M + 1):
        p = probs[M - m:].mean(0)
        out["accuracy"].append(float((w * (p.argmax(-1) == labels)).sum()))
        out["nll"].append(float(-(w * np.log(p[np.arange(len(labels)), labels])).sum()))
        votes = np.zeros_like(p)
        for j in range(M - m, M):
            votes[np.arange(len(labels)), probs[j].argmax(-1)] += 1
        out["vote_accuracy"].append(float((w * (votes.argmax(-1) == labels)).sum()))  # ties -> lowest index
    return out


def _linear_apply(params, batch_stats, x, *, train, rng=None):
    """A stand-in model with a 'batch statistic': logits = (x - mean) @ w + b."""
    x = x.reshape(x.shape[0], -1)
    return (x - batch_stats["mean"]) @ params["w"] + params["b"], batch_stats


def test_ensemble_sums_match_numpy():
    rng = np.random.default_rng(0)
    M, B, D, K = 5, 37, 6, 4
    params = {"w": rng.normal(size=(M, D, K)).astype(np.float32) * 2, "b": rng.normal(size=(M, K)).astype(np.float32)}
    stats = {"mean": rng.normal(size=(M, D)).astype(np.float32)}
    x = rng.normal(size=(B, D)).astype(np.float32)
    y = rng.integers(0, K, size=B).astype(np.int32)
    mask = (rng.random(B) < 0.8).astype(np.float32)
    got = jax.jit(ensemble_sums, static_argnums=0)(_linear_apply, params, stats, {"image": x, "label": y, "mask": mask})
    logits = np.stack([(x - stats["mean"][i]) @ params["w"][i] + params["b"][i] for i in range(M)])
    ref = _np_ensemble(logits, y, mask)
    np.testing.assert_allclose(got["count"], mask.sum())
    np.testing.assert_allclose(np.asarray(got["correct"]) / mask.sum(), ref["accuracy"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["nll_sum"]) / mask.sum(), ref["nll"], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got["vote_correct"]) / mask.sum(), ref["vote_accuracy"], atol=1e-6)
    # m = 1 is the last snapshot alone, m = M all of them; the curves are not all equal
    assert len(set(np.round(ref["nll"], 6))) > 1


def test_hard_vote_hand_example():
    # 3 members, 1 example, 3 classes; argmaxes (in order): 2, 1, 1
    lp = jnp.log(jnp.array([[[0.1, 0.2, 0.7]], [[0.2, 0.5, 0.3]], [[0.1, 0.6, 0.3]]]))
    # last 1: {1} -> 1; last 2: {1, 1} -> 1; last 3: {2, 1, 1} -> 1
    assert vote_predictions(lp)[:, 0].tolist() == [1, 1, 1]
    # tie: members argmax 2 then 0 -> last 2 votes {0: 1, 2: 1} -> lowest index 0
    lp = jnp.log(jnp.array([[[0.1, 0.2, 0.7]], [[0.8, 0.1, 0.1]]]))
    assert vote_predictions(lp)[:, 0].tolist() == [0, 0]


def test_evaluate_ensemble_real_model_matches_per_snapshot_loop(digits):
    _, test = digits
    model = make_model("cnn", 10, width=0.25)
    from mergejax.core.models import apply_model, init_variables
    from mergejax.core.train import model_apply_fn

    snaps = []
    for i in range(3):
        p, s = init_variables(model, jax.random.key(i), (1, 8, 8, 1))
        s = jax.tree.map(lambda v, i=i: v + 0.1 * (i + 1), s)  # non-trivial BN statistics
        snaps.append({"params": p, "batch_stats": s})
    st = stack_snapshots(snaps)
    small = data.Split(test.images[:130], test.labels[:130], test.num_classes, test.name)
    got = evaluate_ensemble(model_apply_fn(model), st["params"], st["batch_stats"], small, batch_size=50)  # padded last batch
    seq = evaluate_ensemble(model_apply_fn(model), st["params"], st["batch_stats"], small, batch_size=50, member_map="map")
    one = jax.jit(lambda p, s: apply_model(model, p, s, small.images, train=False)[0])  # a second implementation: loop
    logits = np.stack([np.asarray(one(s["params"], s["batch_stats"])) for s in snaps])
    ref = _np_ensemble(logits, small.labels, np.ones(130))
    assert got["m"] == [1, 2, 3]
    np.testing.assert_allclose(got["accuracy"], ref["accuracy"], atol=1e-6)
    np.testing.assert_allclose(got["nll"], ref["nll"], rtol=1e-5)
    np.testing.assert_allclose(got["vote_accuracy"], ref["vote_accuracy"], atol=1e-6)
    np.testing.assert_allclose(got["error"], 1 - np.asarray(ref["accuracy"]), atol=1e-6)
    for key in ("accuracy", "nll", "vote_accuracy"):  # lax.map over members: the same numbers
        np.testing.assert_allclose(seq[key], ref[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="member_map"):
        evaluate_ensemble(model_apply_fn(model), st["params"], st["batch_stats"], small, member_map="loop")


def test_stack_snapshots_errors_name_the_leaf():
    a = {"head": {"kernel": jnp.zeros((4, 3))}}
    b = {"head": {"kernel": jnp.zeros((5, 3))}}
    with pytest.raises(ValueError, match=r"snapshot 1 has leaf \['head'\]\['kernel'\] of shape \(5, 3\)"):
        stack_snapshots([a, b])
    st = stack_snapshots([a, a])
    assert st["head"]["kernel"].shape == (2, 4, 3) and len(trees.unstack(st)) == 2


def _tiny_run(train, num_steps, state, callbacks=()):
    state = jax.tree.map(jnp.copy, state)  # fit donates its input
    return fit(state, train, num_steps=num_steps, batch_size=32, seed=3, callbacks=callbacks, progress=False)[0]


def test_collector_takes_snapshot_at_each_cycle_end(digits, tmp_path):
    train, _ = digits
    T, M = 14, 3  # not divisible: cycles of 4, 5, 5 steps
    lr_fn = schedules.snapshot_cosine(0.1, T, M)
    bounds = schedules.snapshot_boundaries(T, M)
    assert bounds == (4, 9, 14)
    model = make_model("cnn", 10, width=0.25)
    state = create_state(model, jax.random.key(0), (1, 8, 8, 1), make_optimizer("sgd", lr_fn, nesterov=True), lr_fn=lr_fn)
    mem = SnapshotCollector(bounds)
    disk = SnapshotCollector(bounds, directory=str(tmp_path / "snaps"))
    final = _tiny_run(train, T, state, [mem, disk])
    assert mem.steps == list(bounds) and disk.steps == list(bounds)
    # independent reference: the same deterministic run stopped at each boundary
    for b, snap, dsnap in zip(bounds, mem.snapshots(), disk.snapshots()):
        ref = final if b == T else _tiny_run(train, b, state)
        for got in (snap, dsnap):
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), got["params"], ref.params)
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), got["batch_stats"], ref.batch_stats)
    # snapshots differ from each other (the collector did not alias one buffer)
    k0, k1 = (s["params"]["head"]["dense"]["kernel"] for s in mem.snapshots()[:2])
    assert not np.allclose(k0, k1)
    p, s = mem.stacked(last=2)
    assert jax.tree.leaves(p)[0].shape[0] == 2
    # a collector over an existing directory picks the snapshots up (resume)
    again = SnapshotCollector(bounds, directory=str(tmp_path / "snaps"))
    assert again.steps == list(bounds)


def test_collector_validates():
    with pytest.raises(ValueError, match="distinct"):
        SnapshotCollector((3, 3))
    with pytest.raises(ValueError, match="no snapshot"):
        SnapshotCollector((3,)).stacked()


def test_load_snapshots_in_step_order_skipping_partial_saves(tmp_path):
    d = str(tmp_path / "snaps")
    with pytest.raises(FileNotFoundError, match="no snapshot"):
        load_snapshots(d)
    for step in (10, 2):
        checkpoint.save(os.path.join(d, f"step_{step}"), {"params": {"w": np.full(3, float(step), np.float32)}, "batch_stats": {}})
    os.makedirs(os.path.join(d, "step_5.tmp-0123abcd"))  # a save cut short by a kill
    got = load_snapshots(d, {"params": {"w": np.zeros(3, np.float32)}, "batch_stats": {}})
    assert [float(s["params"]["w"][0]) for s in got] == [2.0, 10.0]


class _Interrupt(Exception):
    pass


def _stop_at(step):
    def cb(done, state):
        if done == step:
            raise _Interrupt
    return cb


def test_fit_with_snapshots_resumed_equals_uninterrupted(digits, tmp_path):
    """Killed after the snapshot at step 4 and the checkpoint at 6, then re-run: the snapshot
    on disk is kept (not rewritten), later ones are taken, and snapshots, final state and the
    metrics log equal those of a run that was never stopped."""
    train, test = digits
    T, M = 14, 3
    lr_fn = schedules.snapshot_cosine(0.1, T, M)
    bounds = schedules.snapshot_boundaries(T, M)  # (4, 9, 14)
    state = create_state(make_model("cnn", 10, width=0.25), jax.random.key(0), (1, 8, 8, 1),
                         make_optimizer("sgd", lr_fn, nesterov=True), lr_fn=lr_fn)
    kw = dict(num_steps=T, batch_size=32, seed=3, log_every=2, checkpoint_every=3, progress=False, manifest={"test": 1})
    fresh = lambda: jax.tree.map(jnp.copy, state)  # noqa: E731 - fit donates its input
    ref_state, ref_snaps, ref_log = fit_with_snapshots(fresh(), train, bounds, str(tmp_path / "a"), **kw)
    assert len(ref_snaps) == M

    work = str(tmp_path / "b")
    with pytest.raises(_Interrupt):
        fit_with_snapshots(fresh(), train, bounds, work, callbacks=[_stop_at(8)], **kw)
    first = os.path.join(work, "snapshots", "step_4")
    assert sorted(os.listdir(os.path.join(work, "snapshots"))) == ["step_4"]
    mtime = os.stat(first).st_mtime_ns
    got_state, got_snaps, got_log = fit_with_snapshots(fresh(), train, bounds, work, **kw)
    assert os.stat(first).st_mtime_ns == mtime  # taken before the kill, read back, not retaken
    # each snapshot is stored once: the last one is fit's final checkpoint, read back by final_snapshot
    assert sorted(os.listdir(os.path.join(work, "snapshots"))) == ["step_4", "step_9"]
    last = final_snapshot(work, ref_snaps[-1])
    jax.tree.map(np.testing.assert_array_equal, last, {"params": got_state.params, "batch_stats": got_state.batch_stats})
    close = lambda a, b: jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)  # noqa: E731
    for a, b in zip(got_snaps, ref_snaps, strict=True):
        close(a, b)
    close(got_state.params, ref_state.params)
    drop_time = lambda log: [{k: v for k, v in r.items() if k != "time_s"} for r in log]  # noqa: E731
    assert drop_time(got_log) == drop_time(ref_log)
    # the curve of the reloaded snapshots is the curve of the stacked ones
    p, s = stack_snapshots([x["params"] for x in got_snaps]), stack_snapshots([x["batch_stats"] for x in got_snaps])
    assert ensemble_curve(got_state.apply_fn, got_snaps, test, 128) == evaluate_ensemble(got_state.apply_fn, p, s, test, 128)


def test_curve_summary_is_mean_and_sample_std_over_runs():
    a = {"m": [1, 2], "error": [0.2, 0.1], "nll": [0.5, 0.4], "vote_accuracy": [0.8, 0.7]}
    b = {"m": [1, 2], "error": [0.4, 0.3], "nll": [0.7, 0.2], "vote_accuracy": [0.6, 0.9]}
    s = curve_summary([a, b])
    assert s["members"] == 2 and s["error_pct"]["n"] == 2
    np.testing.assert_allclose([s["error_pct"]["mean"], s["error_pct"]["std"]], [20.0, np.std([10, 30], ddof=1)])
    np.testing.assert_allclose([s["nll"]["mean"], s["vote_error_pct"]["mean"]], [0.3, 20.0])
    np.testing.assert_allclose([x["mean"] for x in s["error_vs_m_pct"]], [30.0, 20.0])
    assert curve_summary([a])["error_pct"]["std"] == 0.0
