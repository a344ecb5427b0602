"""compress(big, gates) computes what the gated big student computes with the kept units."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.merging.compress import compress, keep_index
from mergejax.merging.gates import deterministic, gated_apply
from mergejax.core.models import apply_model, init_variables, make_model
from mergejax.core.units import unit_spec, variables_of

from conftest import MODEL_CASES as CASES, params_slow


def _gates_keeping_half(spec, seed):
    """log_alpha: -10 (deterministic gate exactly 0) on a random half, in (-1.2, 4) elsewhere
    (gates in (0.17, 1]); returns (log_alphas, the kept index)."""
    rng = np.random.default_rng(seed)
    la, keep = {}, {}
    for g, n in spec.groups.items():
        k = np.sort(rng.permutation(n)[: n // 2])
        a = np.full(n, -10.0, np.float32)
        a[k] = rng.uniform(-1.2, 4.0, len(k))
        la[g], keep[g] = jnp.asarray(a), k
    return la, keep


@pytest.mark.parametrize("name,kw,shape", params_slow(CASES, [c[0] for c in CASES], {"wrn"}))
def test_compressed_student_equals_gated_big_student(name, kw, shape):
    teacher = make_model(name, 10, **kw)
    big_model = make_model(name, 10, **{**kw, "width": kw.get("width", 1.0) * 2})
    teacher_shapes = jax.eval_shape(lambda k: variables_of(*init_variables(teacher, k, shape)), jax.random.key(0))
    bp, bs = init_variables(big_model, jax.random.key(1), shape)
    bs = jax.tree.map(lambda x: x + 0.2 * jax.random.uniform(jax.random.key(2), x.shape), bs)
    big = variables_of(bp, bs)
    spec = unit_spec(big_model, big)
    la, keep = _gates_keeping_half(spec, 0)
    student, kept = compress(big, la, spec)
    assert {g: list(k) for g, k in kept.items()} == {g: list(k) for g, k in keep.items()}
    assert jax.tree.map(jnp.shape, student) == jax.tree.map(jnp.shape, teacher_shapes)
    x = jax.random.normal(jax.random.key(3), shape)
    det = {g: deterministic(a) for g, a in la.items()}
    for train in (False, True):
        want, want_stats = gated_apply(big_model, big["params"], big["batch_stats"], x, det, spec, train=train)
        got, got_stats = apply_model(teacher, student["params"], student["batch_stats"], x, train=train)
        np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-4)
        if train:  # updated running statistics of the kept units agree too
            from mergejax.core.units import take_units
            sliced = take_units(variables_of(big["params"], want_stats), spec, keep)["batch_stats"]
            jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, atol=1e-5, rtol=1e-5), got_stats, sliced)
    plain, _ = apply_model(big_model, big["params"], big["batch_stats"], x, train=False)
    assert float(jnp.abs(plain - want).max()) > 1e-3  # the gates did matter


def test_folding_is_needed_and_ranking_uses_log_alpha():
    model = make_model("mlp", 10, hidden=(8, 6))
    p, s = init_variables(model, jax.random.key(0), (2, 8, 8, 1))
    v = variables_of(p, s)
    spec = unit_spec(model, v)
    # Ties at deterministic gate 1 are broken by log_alpha; ties in log_alpha by lower index.
    la = {"dense0": jnp.asarray([3.0, 5.0, -4.0, 2.9, 4.0, -3.0, 0.0, 2.5]), "dense1": jnp.asarray([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])}
    keep = keep_index(la, spec)
    assert list(keep["dense0"]) == [0, 1, 3, 4]
    assert list(keep["dense1"]) == [0, 1, 2]
    student, _ = compress(v, la, spec)
    z = np.asarray(deterministic(la["dense1"]))[[0, 1, 2]]
    np.testing.assert_allclose(student["params"]["head"]["dense"]["kernel"],
                               np.asarray(p["head"]["dense"]["kernel"])[[0, 1, 2]] * z[:, None], rtol=1e-6)
    unfolded, _ = compress(v, la, spec, fold=False)  # the authors' notebook: the kept weights as they are
    np.testing.assert_array_equal(unfolded["params"]["head"]["dense"]["kernel"], np.asarray(p["head"]["dense"]["kernel"])[[0, 1, 2]])
    with pytest.raises(ValueError, match="dense1"):
        compress(v, {"dense0": la["dense0"]}, spec)
