"""Local SGD rounds (workers simulated with vmap on one device) against gradient averaging
(one device, concatenated batches), the seed's hand example and closed-form DiLoCo steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mergejax.averaging import local_sgd
from mergejax.core.models import make_model
from mergejax.core.optim import make_optimizer
from mergejax.core.train import TrainState, create_state, train_step


def _lin_step(state, batch, rng):
    """Loss <g, w>: the gradient is the batch's vector g (the seed's worked example)."""
    g = jax.grad(lambda p: jnp.vdot(batch["g"], p["w"]))(state.params)
    updates, opt = state.tx.update(g, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt), {
        "loss": jnp.vdot(batch["g"], state.params["w"]), "accuracy": jnp.zeros(())}


def _lin_state(tx):
    return TrainState.create(apply_fn=None, params={"w": jnp.zeros(2)}, batch_stats={}, tx=tx)


def _hand_batches():
    return {"g": jnp.array([[[1.0, 1.0]], [[1.0, -1.0]]])}  # (W=2, K=1, 2)


def test_hand_example_plain_average():
    state = local_sgd.init(_lin_state(optax.sgd(1.0)), 2, optax.sgd(1.0))
    rnd = local_sgd.make_round(2, step_fn=_lin_step)
    state, _ = rnd(state, _hand_batches(), jax.random.key(0))
    np.testing.assert_array_equal(state.params["w"], [-1.0, 0.0])
    np.testing.assert_array_equal(state.workers.params["w"], [[-1.0, 0.0], [-1.0, 0.0]])


def test_diloco_outer_nesterov_closed_form():
    outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
    state = local_sgd.init(_lin_state(optax.sgd(1.0)), 2, outer)
    rnd = local_sgd.make_round(2, step_fn=_lin_step)
    # Outer gradient is (1, 0) every round. Nesterov: m1 = 1, u1 = -0.7 (1 + 0.9 * 1);
    # m2 = 0.9 + 1 = 1.9, u2 = -0.7 (1 + 0.9 * 1.9).
    state, _ = rnd(state, _hand_batches(), jax.random.key(0))
    np.testing.assert_allclose(state.params["w"], [-1.33, 0.0], rtol=1e-6)
    state, _ = rnd(state, _hand_batches(), jax.random.key(0))
    np.testing.assert_allclose(state.params["w"], [-1.33 - 0.7 * 2.71, 0.0], rtol=1e-6)


W, B = 4, 8


def _data(rounds, K, seed=0):
    r = np.random.default_rng(seed)
    img = r.normal(size=(rounds, W, K, B, 8, 8, 1)).astype(np.float32)
    lab = r.integers(0, 10, size=(rounds, W, K, B)).astype(np.int32)
    return img, lab


def _run_local(tx, K, rounds, policy="keep", inits=None, outer=None):
    model = make_model("mlp", 10, hidden=(16,))
    base = create_state(model, jax.random.key(0), (1, 8, 8, 1), tx)
    workers = base if inits is None else [create_state(model, jax.random.key(s), (1, 8, 8, 1), tx) for s in inits]
    state = local_sgd.init(workers, W, outer)
    rnd = local_sgd.make_round(W, policy=policy)
    img, lab = _data(rounds, K)
    for r in range(rounds):
        state, _ = rnd(state, {"image": img[r], "label": lab[r]}, jax.random.key(r))
    return state, base


def _run_sync(base, K, rounds):
    """Gradient averaging: every step uses all workers' k-th batches at once."""
    step = jax.jit(train_step)
    img, lab = _data(rounds, K)
    s = base
    for r in range(rounds):
        for k in range(K):
            batch = {"image": img[r, :, k].reshape(W * B, 8, 8, 1), "label": lab[r, :, k].reshape(W * B)}
            s, _ = step(s, batch, jax.random.key(0))
    return s


def _gap(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name,tx,policy", [
    ("sgd", optax.sgd(0.1), "keep"),
    ("momentum-keep", optax.sgd(0.1, momentum=0.9), "keep"),
    ("momentum-average", optax.sgd(0.1, momentum=0.9), "average"),
    ("nesterov+wd", make_optimizer("sgd", 0.1, momentum=0.9, nesterov=True, weight_decay=1e-3), "average"),
])
def test_k1_equals_gradient_averaging(name, tx, policy):
    state, base = _run_local(tx, K=1, rounds=3, policy=policy)
    ref = _run_sync(base, K=1, rounds=3)
    assert _gap(state.params, ref.params) < 2e-6, name
    assert _gap(state.params, jax.tree.map(lambda x: x[2], state.workers.params)) == 0.0


@pytest.mark.parametrize("case", ["K=4", "adam", "clipping", "different-init"])
def test_where_equivalence_breaks(case):
    K, tx, inits = 1, optax.sgd(0.1), None
    if case == "K=4":
        K = 4
    elif case == "adam":
        tx = optax.adam(1e-2)
    elif case == "clipping":
        tx = make_optimizer("sgd", 0.5, momentum=0.0, grad_clip=0.05)
    else:
        inits = [0, 1, 2, 3]
    state, base = _run_local(tx, K=K, rounds=2, inits=inits)
    ref = _run_sync(base, K=K, rounds=2)
    assert _gap(state.params, ref.params) > 1e-4, case
    # Control: the same configuration with K = 1 / plain SGD / shared init agrees.
    if case == "K=4":
        s1, b1 = _run_local(tx, K=1, rounds=2)
        assert _gap(s1.params, _run_sync(b1, 1, 2).params) < 2e-6


def test_policies():
    tx = optax.sgd(0.1, momentum=0.9)
    reset, _ = _run_local(tx, K=2, rounds=1, policy="reset")
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(reset.workers.opt_state))
    keep, _ = _run_local(tx, K=2, rounds=1, policy="keep")
    mom = jax.tree.leaves(keep.workers.opt_state)
    assert any(float(jnp.abs(m[0] - m[1]).max()) > 0 for m in mom)  # workers keep their own buffers
    av, _ = _run_local(tx, K=2, rounds=1, policy="average")
    for a, k in zip(jax.tree.leaves(av.workers.opt_state), mom):
        np.testing.assert_allclose(a[0], np.mean(np.asarray(k, np.float64), 0), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="policy"):
        local_sgd.make_round(W, policy="sometimes")


def test_shard_steps_layout():
    """Worker i's k-th local batch is rows i*b .. (i+1)*b - 1 of the k-th global batch."""
    stream = iter([{"x": np.arange(12).reshape(6, 2) + 100 * k} for k in range(3)])
    out = local_sgd.shard_steps(stream, num_workers=3, num_local=2)
    assert out["x"].shape == (3, 2, 2, 2)
    np.testing.assert_array_equal(out["x"][1, 0], [[4, 5], [6, 7]])
    np.testing.assert_array_equal(out["x"][2, 1], [[108, 109], [110, 111]])
    assert next(stream)["x"][0, 0] == 200  # took exactly num_local batches
    with pytest.raises(ValueError, match="does not split"):
        local_sgd.shard_steps(iter([{"x": np.zeros((5, 1))}]), num_workers=2, num_local=1)


def _split(n=96, seed=0):
    from mergejax.core import data

    r = np.random.default_rng(seed)
    return data.Split(r.normal(size=(n, 8, 8, 1)).astype(np.float32), r.integers(0, 10, n).astype(np.int32), 10, "random")


@pytest.mark.parametrize("tx", [optax.sgd(0.1), optax.sgd(0.05, momentum=0.9)], ids=["sgd", "momentum"])
def test_train_rounds_k1_equals_fit(tx):
    """train_rounds shards fit's own batch stream, so K = 1 is fit's gradient averaging."""
    from mergejax.core.loop import fit

    model, split = make_model("mlp", 10, hidden=(16,)), _split()
    s0 = create_state(model, jax.random.key(0), (1, 8, 8, 1), tx)
    kw = dict(num_steps=8, batch_size=W * B, seed=3)  # 3 batches of 32 per epoch: crosses epochs
    sync, _ = fit(create_state(model, jax.random.key(0), (1, 8, 8, 1), tx), split, **kw, progress=False)
    local, metrics = local_sgd.train_rounds(local_sgd.init(s0, W), split, **kw, num_local=1)
    assert len(metrics) == 8 and int(local.rounds) == 8
    assert _gap(local.params, sync.params) < 2e-6
    assert _gap(sync.params, s0.params) > 1e-2  # training moved
    far, _ = local_sgd.train_rounds(local_sgd.init(s0, W), split, **kw, num_local=4)
    assert _gap(far.params, sync.params) > 1e-4
    with pytest.raises(ValueError, match="multiple"):
        local_sgd.train_rounds(local_sgd.init(s0, W), split, **kw, num_local=3)
    rows = local_sgd.divergence(s0, sync, split, split, num_workers=W, ks=(1, 4), **kw)
    assert [r["K"] for r in rows] == [1, 4]
    assert rows[0]["rel_dist"] < 1e-5 and rows[0]["local_acc"] == rows[0]["sync_acc"]
    assert rows[1]["param_dist"] >= _gap(far.params, sync.params) * (1 - 1e-6)  # the same run: L2 >= max |.|
    assert rows[1]["param_dist"] > 10 * rows[0]["param_dist"]
