"""Hard-concrete gates against float64 closed forms; L_half by hand; gated forward pass."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.merging import gates as G
from mergejax.core.models import apply_model, init_variables, make_model
from mergejax.core.units import unit_spec, variables_of

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_prob_open_and_deterministic_gate_float64(x64):
    la = np.linspace(-6.0, 6.0, 41)
    p = np.asarray(G.prob_open(jnp.asarray(la)))
    assert p.dtype == np.float64
    # P[g > 0] = P[s > -gamma/(zeta-gamma)] with s = sigmoid((L + la)/beta), L ~ Logistic(0, 1).
    t = -GAMMA / (ZETA - GAMMA)
    ref = 1.0 - _sigmoid(BETA * np.log(t / (1 - t)) - la)
    np.testing.assert_allclose(p, ref, rtol=1e-12)
    det = np.asarray(G.deterministic(jnp.asarray(la)))
    np.testing.assert_allclose(det, np.clip(_sigmoid(la) * 1.2 - 0.1, 0, 1), rtol=1e-12, atol=1e-15)
    assert det[0] == 0.0 and det[-1] == 1.0
    # Every deterministic gate is exactly 1 from log_alpha = log(11) on (sigmoid = 11/12).
    assert float(G.deterministic(jnp.asarray(math.log(11.0) + 1e-9))) == 1.0
    assert float(G.deterministic(jnp.asarray(math.log(11.0) - 1e-3))) < 1.0


def test_l_half_hand_worked(x64):
    # log_alpha = beta log(-gamma/zeta) gives P = sigmoid(0) = 1/2; with log_alpha -> +inf P -> 1.
    c = BETA * math.log(0.1 / 1.1)
    la = jnp.asarray([c, c, 60.0, 60.0])  # P = 1/2, 1/2, 1, 1 -> mean 3/4
    np.testing.assert_allclose(float(G.l_half(la)), (0.5 - 0.75) ** 2, rtol=1e-12)
    la2 = jnp.asarray([c + math.log(3.0)])  # P = sigmoid(log 3) = 3/4 -> (1/4)^2
    np.testing.assert_allclose(float(G.l_half(la2)), 1 / 16, rtol=1e-12)
    total = G.total_l_half({"a": la, "b": la2, "c": jnp.asarray([c, c])})
    np.testing.assert_allclose(float(total), 1 / 16 + 1 / 16 + 0.0, rtol=1e-12)


def test_sampled_gate_distribution_matches_closed_form_cdf(x64):
    la = jnp.asarray([-1.0, 0.5, 2.0])
    n = 200_000
    g = np.asarray(G.sample(jax.random.key(0), la, (n,)))
    assert g.shape == (n, 3) and g.min() >= 0 and g.max() <= 1
    tol = 4 * math.sqrt(0.25 / n)
    for j, a in enumerate(np.asarray(la)):
        np.testing.assert_allclose(np.mean(g[:, j] > 0), float(G.prob_open(la[j])), atol=tol)
        # P[g = 1] = P[s >= (1-gamma)/(zeta-gamma)] = sigmoid(a - beta log 11)
        np.testing.assert_allclose(np.mean(g[:, j] == 1), _sigmoid(a - BETA * math.log(11.0)), atol=tol)
        # P[g <= t] for t in (0, 1): 1 - sigmoid(a - beta logit((t - gamma)/(zeta - gamma)))
        for t in (0.2, 0.5, 0.8):
            q = (t - GAMMA) / (ZETA - GAMMA)
            np.testing.assert_allclose(np.mean(g[:, j] <= t), 1 - _sigmoid(a - BETA * np.log(q / (1 - q))), atol=tol)


def test_lambda_schedule():
    v = G.lambda_values(0.05, 0.05, 4)
    ref = [0.05]
    for _ in range(3):
        ref.append(ref[-1] + 0.05 * math.sqrt(ref[-1]))
    np.testing.assert_allclose(v, ref, rtol=1e-6)
    sched = G.lambda_schedule(0.05, 0.05, steps_per_epoch=10, epochs=4)
    np.testing.assert_allclose([float(sched(s)) for s in (0, 9, 10, 35, 1000)], [ref[0], ref[0], ref[1], ref[3], ref[3]], rtol=1e-6)
    # The authors' CIFAR-100 setting reaches about 6.5 after 100 epochs (reference: 6.55 for the
    # same lam0/c on ImageWoof 0.01/0.05; here the recurrence itself is the reference).
    assert 5.0 < G.lambda_values(0.05, 0.05, 100)[-1] < 8.0


def _net(name, kw, shape):
    model = make_model(name, 10, **kw)
    p, s = init_variables(model, jax.random.key(0), shape)
    s = jax.tree.map(lambda x: x + 0.1 * jax.random.uniform(jax.random.key(1), x.shape), s)
    return model, variables_of(p, s)


def test_gated_forward_equals_manual_mlp_float64(x64):
    model, v = _net("mlp", dict(hidden=(6, 5)), (3, 2, 2, 1))
    v = jax.tree.map(lambda x: x.astype(jnp.float64), v)
    spec = unit_spec(model, v)
    x = np.asarray(jax.random.normal(jax.random.key(1), (3, 2, 2, 1)), np.float64)
    gates = {"dense0": G.sample(jax.random.key(2), jnp.zeros(6), (3,)), "dense1": jnp.linspace(0, 1, 5)}
    out, _ = G.gated_apply(model, v["params"], v["batch_stats"], jnp.asarray(x), gates, spec, train=False)
    P = jax.tree.map(np.asarray, v["params"])
    h = np.maximum(x.reshape(3, -1) @ P["dense0"]["dense"]["kernel"] + P["dense0"]["dense"]["bias"], 0)
    h = h * np.asarray(gates["dense0"])
    h = np.maximum(h @ P["dense1"]["dense"]["kernel"] + P["dense1"]["dense"]["bias"], 0)
    h = h * np.asarray(gates["dense1"])
    ref = h @ P["head"]["dense"]["kernel"] + P["head"]["dense"]["bias"]
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12)


def test_gated_forward_ones_is_identity_and_zero_stream_gate_blocks_resnet():
    model, v = _net("resnet20", {}, (2, 8, 8, 3))
    spec = unit_spec(model, v)
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    plain, _ = apply_model(model, v["params"], v["batch_stats"], x, train=False)
    assert float(jnp.abs(plain).max()) > 1e-2
    ones = {g: jnp.ones((2, n)) for g, n in spec.groups.items()}
    gated, _ = G.gated_apply(model, v["params"], v["batch_stats"], x, ones, spec, train=False)
    np.testing.assert_allclose(gated, plain, atol=1e-5)
    # Closing the last stream's gate leaves only the classifier bias.
    closed, _ = G.gated_apply(model, v["params"], v["batch_stats"], x, {"stage3": jnp.zeros(64)}, spec, train=False)
    np.testing.assert_allclose(closed, jnp.broadcast_to(v["params"]["head"]["dense"]["bias"], closed.shape), atol=1e-6)
    # ...and the block consumers see it: closing stage1 changes the output.
    mid, _ = G.gated_apply(model, v["params"], v["batch_stats"], x, {"stage1": jnp.zeros(16)}, spec, train=False)
    assert float(jnp.abs(mid - plain).max()) > 1e-3
    assert G.consumer_groups(spec)[("stage1_block1", "conv1")] == "stage1"
    assert G.consumer_groups(spec)[("stage2_block0", "proj_conv")] == "stage1"
    with pytest.raises(ValueError, match="stage9"):
        G.gated_apply(model, v["params"], v["batch_stats"], x, {"stage9": jnp.ones(3)}, spec, train=False)


def test_init_log_alpha_starts_as_ensemble():
    model, v = _net("mlp", dict(hidden=(6, 5)), (1, 4))
    spec = unit_spec(model, v)
    la = G.init_log_alpha(jax.random.key(0), spec, mean=3.0)
    assert {g: a.shape for g, a in la.items()} == {g: (n,) for g, n in spec.groups.items()}
    assert all(bool(jnp.all(G.deterministic(a) == 1.0)) for a in la.values())
    b = G.binariness(la)
    assert b["frac_one"] == 1.0 and b["mean_dist_to_binary"] == 0.0
