"""concat(teacher_a, teacher_b) is the width-2 model whose logits are the teachers' mean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from mergejax.merging.concat import concat, concat_spec
from mergejax.core.models import apply_model, init_variables, make_model
from mergejax.core.units import check_spec, unit_spec, variables_of

from conftest import MODEL_CASES as CASES
from conftest import teacher_variables as teacher



def big_model(name, kw):
    return make_model(name, 10, **{**kw, "width": kw.get("width", 1.0) * 2})


@pytest.mark.parametrize("name,kw,shape", CASES, ids=[c[0] for c in CASES])
def test_big_student_is_width2_model_and_mean_of_teachers(name, kw, shape):
    model, va = teacher(name, kw, shape, 0)
    _, vb = teacher(name, kw, shape, 1)
    spec = unit_spec(model, va)
    big = concat(va, vb, spec)
    bmodel = big_model(name, kw)
    ref = jax.eval_shape(lambda k: variables_of(*init_variables(bmodel, k, shape)), jax.random.key(0))
    assert jax.tree.map(jnp.shape, big) == jax.tree.map(jnp.shape, ref)
    check_spec(concat_spec(spec), big)
    assert unit_spec(bmodel, big).groups == concat_spec(spec).groups
    x = jax.random.normal(jax.random.key(7), shape)
    for train in (False, True):
        la, sa = apply_model(model, va["params"], va["batch_stats"], x, train=train)
        lb, sb = apply_model(model, vb["params"], vb["batch_stats"], x, train=train)
        lbig, sbig = apply_model(bmodel, big["params"], big["batch_stats"], x, train=train)
        np.testing.assert_allclose(lbig, (la + lb) / 2, atol=2e-5, rtol=1e-4)
        # Updated running statistics are the concatenation of the teachers' updates.
        expect = concat(variables_of(va["params"], sa), variables_of(vb["params"], sb), spec)["batch_stats"]
        jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, atol=1e-5, rtol=1e-5), sbig, expect)
    # Not vacuous: the teachers disagree.
    assert float(jnp.abs(la - lb).max()) > 1e-3


def test_mlp_leaves_against_numpy_block_matrices():
    model, va = teacher("mlp", {}, (2, 8, 8, 1), 0)
    _, vb = teacher("mlp", {}, (2, 8, 8, 1), 1)
    big = concat(va, vb, unit_spec(model, va))
    A, B, Bg = va["params"], vb["params"], big["params"]
    np.testing.assert_array_equal(Bg["dense0"]["dense"]["kernel"],
                                  np.hstack([A["dense0"]["dense"]["kernel"], B["dense0"]["dense"]["kernel"]]))
    np.testing.assert_array_equal(Bg["dense1"]["dense"]["kernel"],
                                  scipy.linalg.block_diag(A["dense1"]["dense"]["kernel"], B["dense1"]["dense"]["kernel"]))
    np.testing.assert_array_equal(Bg["dense1"]["dense"]["bias"],
                                  np.concatenate([A["dense1"]["dense"]["bias"], B["dense1"]["dense"]["bias"]]))
    np.testing.assert_allclose(Bg["head"]["dense"]["kernel"],
                               np.vstack([A["head"]["dense"]["kernel"], B["head"]["dense"]["kernel"]]) / 2)
    np.testing.assert_allclose(Bg["head"]["dense"]["bias"],
                               (A["head"]["dense"]["bias"] + B["head"]["dense"]["bias"]) / 2)


def test_resnet_cross_blocks_zero_and_bn_concatenated():
    model, va = teacher("resnet20", {}, (1, 16, 16, 3), 0)
    _, vb = teacher("resnet20", {}, (1, 16, 16, 3), 1)
    big = concat(va, vb, unit_spec(model, va))
    k = big["params"]["stage2_block0"]["proj_conv"]["kernel"]  # (1, 1, 32, 64): stage1 -> stage2
    assert k.shape == (1, 1, 32, 64)
    np.testing.assert_array_equal(k[..., :16, 32:], 0)
    np.testing.assert_array_equal(k[..., 16:, :32], 0)
    np.testing.assert_array_equal(k[..., 16:, 32:], vb["params"]["stage2_block0"]["proj_conv"]["kernel"])
    m = big["batch_stats"]["stage2_block0"]["proj_bn"]["mean"]
    np.testing.assert_array_equal(m, np.concatenate([va["batch_stats"]["stage2_block0"]["proj_bn"]["mean"],
                                                     vb["batch_stats"]["stage2_block0"]["proj_bn"]["mean"]]))


def test_concat_names_mismatched_leaf():
    model, va = teacher("mlp", {}, (1, 8, 8, 1), 0)
    small = make_model("mlp", 10, hidden=(128, 64))
    p, s = init_variables(small, jax.random.key(1), (1, 8, 8, 1))
    with pytest.raises(ValueError, match="dense1"):
        concat(va, variables_of(p, s), unit_spec(model, va))
