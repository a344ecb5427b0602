"""The unit spec is right iff permuting every group's units leaves the function unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.core.models import apply_model, init_variables, make_model
from mergejax.core.units import UnitSpec, check_spec, group_order, take_units, unit_spec, variables_of

from conftest import MODEL_CASES as CASES


def _setup(name, kw, shape):
    model = make_model(name, 10, **kw)
    params, stats = init_variables(model, jax.random.key(0), shape)
    # Non-trivial running statistics, so a wrong permutation of them shows in eval mode.
    stats = jax.tree.map(lambda x: x + jax.random.uniform(jax.random.key(1), x.shape), stats)
    return model, variables_of(params, stats)


@pytest.mark.parametrize("name,kw,shape", CASES, ids=[c[0] for c in CASES])
def test_permuting_units_preserves_function(name, kw, shape):
    model, v = _setup(name, kw, shape)
    spec = unit_spec(model, v)
    rng = np.random.default_rng(0)
    perm = {g: rng.permutation(n) for g, n in spec.groups.items()}
    v2 = take_units(v, spec, perm)
    x = jax.random.normal(jax.random.key(2), shape)
    for train in (False, True):
        a, _ = apply_model(model, v["params"], v["batch_stats"], x, train=train)
        b, _ = apply_model(model, v2["params"], v2["batch_stats"], x, train=train)
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
    # ...and the permutation did move weights (the check above is not vacuous).
    moved = jax.tree.leaves(jax.tree.map(lambda p, q: bool(jnp.any(p != q)), v, v2))
    assert any(moved)


def test_partial_permutation_changes_function():
    """Negative control: permuting a kernel's output units without its BatchNorm breaks it."""
    model, v = _setup("cnn", {}, (4, 8, 8, 1))
    spec = unit_spec(model, v)
    broken = UnitSpec(spec.groups, {**spec.axes, ("params", "conv0", "bn", "scale"): (None,)})
    perm = {"conv0": np.random.default_rng(0).permutation(spec.groups["conv0"])}
    v2 = take_units(v, broken, perm)
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
    v["params"]["conv0"]["bn"]["scale"] = jnp.linspace(0.1, 5.0, spec.groups["conv0"])
    v2["params"]["conv0"]["bn"]["scale"] = v["params"]["conv0"]["bn"]["scale"]
    a, _ = apply_model(model, v["params"], v["batch_stats"], x, train=False)
    b, _ = apply_model(model, v2["params"], v2["batch_stats"], x, train=False)
    assert float(jnp.abs(a - b).max()) > 0.05 * float(jnp.abs(a).max())


def test_resnet_groups_tie_residual_streams():
    model, v = _setup("resnet20", {}, (1, 16, 16, 3))
    spec = unit_spec(model, v)
    # 3 residual streams + one hidden group per block (9 blocks).
    assert sorted(g for g in spec.groups if "/" not in g) == ["stage1", "stage2", "stage3"]
    assert sum("/hidden" in g for g in spec.groups) == 9
    assert spec.groups["stage1"] == 16 and spec.groups["stage3"] == 64
    assert spec.axes[("params", "stem", "conv", "kernel")] == (None, None, None, "stage1")
    # Every stage-1 block reads and writes the same stream; stage 2 starts with a projection.
    assert spec.axes[("params", "stage1_block2", "conv2", "kernel")][-1] == "stage1"
    assert spec.axes[("params", "stage2_block0", "proj_conv", "kernel")][-2:] == ("stage1", "stage2")
    assert set(spec.consumers("stage1")) >= {("params", "stage2_block0", "conv1", "kernel")}
    assert group_order(spec)[:2] == ["stage1", "stage1_block0/hidden"]


def test_check_spec_names_bad_leaf():
    model, v = _setup("mlp", {}, (1, 8, 8, 1))
    spec = unit_spec(model, v)
    axes = dict(spec.axes)
    del axes[("params", "dense1", "dense", "bias")]
    with pytest.raises(ValueError, match="dense1/dense/bias"):
        check_spec(UnitSpec(spec.groups, axes), v)
    with pytest.raises(ValueError, match="dense0"):
        check_spec(UnitSpec({**spec.groups, "dense0": 3}, spec.axes), v)
