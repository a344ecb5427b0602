"""SWA: running mean, the optax transform, and BatchNorm re-estimation, against numpy float64."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mergejax.core import data
from mergejax.core import optim as schedules
from mergejax.core.models import make_model
from mergejax.ensembles.snapshot import SnapshotCollector
from mergejax.ensembles.swa import equal_budget_plans, fge_cycle_steps, recompute_batch_stats, with_swa_average, running_mean, swa_average, swa_model, swa_params, swa_state
from mergejax.core.loop import fit
from mergejax.core.optim import make_optimizer
from mergejax.core.train import create_state


def test_running_mean_is_the_mean():
    rng = np.random.default_rng(0)
    trees = [{"a": rng.normal(size=(3, 2)).astype(np.float32), "b": {"c": rng.normal(size=(4,)).astype(np.float32)}} for _ in range(7)]
    avg = jax.tree.map(jnp.zeros_like, trees[0])
    for n, t in enumerate(trees):
        avg = running_mean(avg, t, n)
    ref = jax.tree.map(lambda *xs: np.mean(np.stack(xs).astype(np.float64), 0), *trees)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), avg, ref)
    # n = 0 gives the new tree whatever avg holds (to rounding); traced n works under jit
    out = jax.jit(running_mean)(trees[1], trees[2], jnp.int32(0))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), out, trees[2])


def test_running_mean_errors_name_the_leaf():
    with pytest.raises(ValueError, match=r"leaf \['a'\] of shape \(3,\)"):
        running_mean({"a": jnp.zeros(2)}, {"a": jnp.zeros(3)}, 1)
    with pytest.raises(ValueError, match=r"only the new tree has leaf \['z'\]"):
        running_mean({"a": jnp.zeros(2)}, {"a": jnp.zeros(2), "z": jnp.zeros(1)}, 1)


@pytest.mark.parametrize("start,every", [(1, 1), (5, 3), (10, 4)])
def test_swa_transform_vs_numpy_sgd(start, every):
    """Gradient descent on 0.5 |w - c|^2 with a decaying lr; SWA mean vs a float64 simulation."""
    c = np.array([1.0, -2.0, 0.5])
    lr_fn = lambda k: 0.3 / (1.0 + 0.1 * k)  # noqa: E731
    tx = optax.chain(optax.sgd(lr_fn), swa_average(start, every))
    w = {"w": jnp.zeros(3, jnp.float32)}
    state = tx.init(w)
    step = jax.jit(lambda w, s: (lambda u, s2: (optax.apply_updates(w, u), s2))(*tx.update(jax.tree.map(lambda x: x - c, w), s, w)))
    ref_w, taken = np.zeros(3), []
    for k in range(20):
        w, state = step(w, state)
        ref_w = ref_w - lr_fn(k) * (ref_w - c)
        s = k + 1
        if s >= start and (s - start) % every == 0:
            taken.append(ref_w.copy())
    assert int(swa_state(state).n) == len(taken)
    np.testing.assert_allclose(swa_params(state)["w"], np.mean(taken, 0), rtol=1e-5)
    np.testing.assert_allclose(w["w"], ref_w, rtol=1e-5)  # the transform left updates unchanged


def test_swa_params_before_start_raises():
    tx = optax.chain(optax.sgd(0.1), swa_average(100))
    state = tx.init({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="averaged no model"):
        swa_params(state)
    with pytest.raises(ValueError, match="exactly one SWAState"):
        swa_state(optax.sgd(0.1).init({"w": jnp.zeros(2)}))


def test_swa_in_fit_equals_mean_of_collected_snapshots(digits):
    """Second implementation: SnapshotCollector at the same steps, averaged in numpy."""
    train, _ = digits
    T, start, every = 16, 7, 3
    lr_fn = schedules.swa_schedule(0.1, 0.02, start)
    tx = optax.chain(make_optimizer("sgd", lr_fn, momentum=0.9), swa_average(start, every))
    state = create_state(make_model("cnn", 10, width=0.25), jax.random.key(0), (1, 8, 8, 1), tx, lr_fn=lr_fn)
    steps = list(range(start, T + 1, every))
    collector = SnapshotCollector(steps)
    state, _ = fit(state, train, num_steps=T, batch_size=32, seed=1, callbacks=[collector], progress=False)
    ref = jax.tree.map(lambda *xs: np.mean(np.stack(xs).astype(np.float64), 0), *[s["params"] for s in collector.snapshots()])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), swa_params(state.opt_state), ref)
    assert int(swa_state(state.opt_state).n) == len(steps) == 4
    model = swa_model(state, train, 64, seed=2)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), model["params"], ref)
    bn = recompute_batch_stats(state.apply_fn, ref, state.batch_stats, train, 64, seed=2)  # of the averaged weights
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), model["batch_stats"], bn)


def test_fge_cycle_steps_longest_even_cycle_that_fits():
    assert fge_cycle_steps(22, 44, 2) == 10 and fge_cycle_steps(165, 330, 5) == 32
    for start in range(1, 30):
        for total in range(start, 80):
            for m in (1, 2, 3, 5):
                c = fge_cycle_steps(start, total, m)
                assert c >= 2 and c % 2 == 0
                if (total - start) // m >= 2:  # room for m cycles: they fit, and 2 more steps each would not
                    assert start + m * c <= total < start + m * (c + 2)
                else:
                    assert c == 2
    with pytest.raises(ValueError, match="num_snapshots"):
        fge_cycle_steps(1, 10, 0)


class _TwoBN(nn.Module):
    momentum: float

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=1e-5, name=name)  # noqa: E731
        x = nn.relu(bn("bn0")(nn.Dense(5, name="d0")(x)))
        x = bn("bn1")(nn.Dense(4, name="d1")(x))
        return nn.Dense(3, name="d2")(x)


def _np_two_bn_stats(p, x):
    """float64: batch mean / biased variance at bn0 and bn1 (train-mode forward)."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    h0 = x @ f(p["d0"]["kernel"]) + f(p["d0"]["bias"])
    m0, v0 = h0.mean(0), h0.var(0)
    z = np.maximum((h0 - m0) / np.sqrt(v0 + 1e-5) * f(p["bn0"]["scale"]) + f(p["bn0"]["bias"]), 0)
    h1 = z @ f(p["d1"]["kernel"]) + f(p["d1"]["bias"])
    return {"bn0": {"mean": m0, "var": v0}, "bn1": {"mean": h1.mean(0), "var": h1.var(0)}}


@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_recompute_batch_stats_vs_numpy(momentum):
    rng = np.random.default_rng(0)
    n, d, bs = 70, 6, 16  # 4 full batches, 6 examples dropped
    split = data.Split(rng.normal(1.0, 2.0, size=(n, d)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32), 3, "toy")
    model = _TwoBN(momentum)
    variables = model.init(jax.random.key(0), jnp.zeros((1, d)), train=False)
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), variables["params"])
    stale = jax.tree.map(lambda s: s + 5.0, variables["batch_stats"])

    def apply_fn(params, batch_stats, x, *, train, rng=None):
        if not train:
            return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False), batch_stats
        out, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
        return out, upd["batch_stats"]

    got = recompute_batch_stats(apply_fn, params, stale, split, bs, seed=4)
    per_batch = [_np_two_bn_stats(params, b["image"].astype(np.float64)) for b in data.batches(split, bs, seed=4, remainder="drop", epochs=1)]
    assert len(per_batch) == 4
    ref = jax.tree.map(lambda *xs: np.mean(xs, 0), *per_batch)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5), got, ref)
    # a model without BatchNorm keeps {}
    assert recompute_batch_stats(apply_fn, params, {}, split, bs) == {}


def test_equal_budget_plans_share_the_budget_and_compare_by_value():
    T, M, per_epoch = 100, 3, 10
    plans = equal_budget_plans(T, per_epoch, M, 0.1, alpha0s=(0.1, 0.2), swa_start=0.5, fge_start=0.5)
    assert sum(plans[f"single_cycle-{j}"].num_steps for j in range(M)) == T  # M cycles of one budget
    assert all(p.num_steps == T for k, p in plans.items() if not k.startswith("single_cycle") and k != "long_teacher")
    assert plans["long_teacher"].num_steps == M * T and plans["long_teacher"].marks == (M * T,)  # the FLOPs of M models
    assert plans["long_teacher"].lr_fn(M * T // 2) == pytest.approx(0.01)  # the single model's decay, stretched
    assert plans["snapshot_0.2"].marks == schedules.snapshot_boundaries(T, M) == plans["single"].marks
    assert plans["swa"].marks == tuple(range(50, T + 1, per_epoch)) and plans["swa"].swa_every == per_epoch
    assert len(plans["fge"].marks) == M and plans["fge"].marks[-1] <= T
    # equal recipes are equal static values, so a re-made optimizer reuses the compiled step
    again = equal_budget_plans(T, per_epoch, M, 0.1, alpha0s=(0.1, 0.2), swa_start=0.5, fge_start=0.5)
    assert again["fge"].lr_fn == plans["fge"].lr_fn and hash(again["fge"].lr_fn) == hash(plans["fge"].lr_fn)
    tx = lambda: with_swa_average(make_optimizer("sgd", plans["swa"].lr_fn), 50, per_epoch)  # noqa: E731
    assert tx() == tx() and hash(tx()) == hash(tx()) and tx() != with_swa_average(make_optimizer("sgd", plans["swa"].lr_fn), 50, 1)
