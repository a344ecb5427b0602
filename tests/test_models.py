"""Models: output shapes, parameter counts vs closed forms and the papers, width, layer names, freezing."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.core.models import MODELS, ResNet, apply_model, count_params, init_variables, make_model

CIFAR = (2, 32, 32, 3)
DIGITS = (2, 8, 8, 1)
INPUT = {"mlp": DIGITS, "cnn": DIGITS}


def _abstract_variables(model, shape):
    """Parameter/batch-stat shapes without running (or compiling) the model."""
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    return v["params"], v.get("batch_stats", {})


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow if n == "densenet100" else ()) for n in sorted(MODELS)])  # CI time
def test_output_shape_every_model(name):
    num_classes = 7
    model = make_model(name, num_classes)
    shape = INPUT.get(name, CIFAR)
    params, stats = _abstract_variables(model, shape)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    for train in (False, True):
        logits, new_stats = jax.eval_shape(
            functools.partial(apply_model, model, train=train), params, stats, x
        )
        assert logits.shape == (shape[0], num_classes) and logits.dtype == jnp.float32
        assert jax.tree.structure(new_stats) == jax.tree.structure(stats)


# Closed forms (conv kernels + BN scale/bias + Dense), written from the papers' architecture tables.
def _bn(c):
    return 2 * c


def _resnet_count(depth, k=10, width=1):
    n = (depth - 2) // 6
    c = [16 * width, 32 * width, 64 * width]
    total = 3 * 3 * 3 * c[0] + _bn(c[0])  # stem
    cin = c[0]
    for s in range(3):
        for b in range(n):
            cout = c[s]
            total += 9 * cin * cout + _bn(cout) + 9 * cout * cout + _bn(cout)
            if cin != cout:  # option-B projection shortcut: 1x1 conv + BN
                total += cin * cout + _bn(cout)
            cin = cout
    return total + cin * k + k


def _wrn_count(depth, widen, k=10):
    n = (depth - 4) // 6
    c = [16 * widen, 32 * widen, 64 * widen]
    total = 3 * 3 * 3 * 16  # stem conv (no BN: pre-activation)
    cin = 16
    for s in range(3):
        for b in range(n):
            cout = c[s]
            total += _bn(cin) + 9 * cin * cout + _bn(cout) + 9 * cout * cout
            if cin != cout:
                total += cin * cout
            cin = cout
    return total + _bn(cin) + cin * k + k


def _vgg_count(cfg, k=10):
    total, cin = 0, 3
    for c in cfg:
        if c != "M":
            total += 9 * cin * c + _bn(c)
            cin = c
    return total + cin * k + k


VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@pytest.mark.parametrize(
    "name,closed_form,paper",
    [
        # He et al. 2016, Table 6: ResNet-20 0.27M, ResNet-110 1.7M. The paper uses the parameter-free
        # option-A shortcut; our option-B projections add 2,752 parameters (+1.0% / +0.16%).
        ("resnet20", _resnet_count(20), 0.27e6),
        ("resnet110", _resnet_count(110), 1.7e6),
        # Zagoruyko & Komodakis 2016, Table 1 / Sec. 3: WRN-28-10 36.5M.
        ("wrn", _wrn_count(28, 10), 36.5e6),
        # VGG-16 with BN on CIFAR (conv without bias since BN follows, Linear(512, 10)): the common
        # 14.7M figure counts conv biases too (+4,224 = 0.03%).
        ("vgg16", _vgg_count(VGG16), 14.7e6),
    ],
)
def test_parameter_counts_match_closed_form_and_paper(name, closed_form, paper):
    params, _ = _abstract_variables(make_model(name, 10), (1, 32, 32, 3))
    n = count_params(params)
    assert n == closed_form, f"{name}: {n} parameters, closed form {closed_form}"
    # The papers round to 2-3 significant digits; 2% covers rounding and the shortcut choice.
    assert abs(n - paper) / paper < 0.02, f"{name}: {n} vs paper {paper}"


def test_resnet_option_a_equivalent_counts():
    # Known exact counts of the option-A CIFAR ResNets (e.g. akamaster/pytorch_resnet_cifar10):
    # ours minus the two projection shortcuts.
    proj = (16 * 32 + _bn(32)) + (32 * 64 + _bn(64))
    assert _resnet_count(20) - proj == 269_722
    assert _resnet_count(110) - proj == 1_727_962


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20", "wrn", "vgg11"])
def test_width_multiplier_doubles_channels(name):
    kw = {"depth": 10, "widen": 2} if name == "wrn" else {}
    shape = INPUT.get(name, CIFAR)
    p1, _ = _abstract_variables(make_model(name, 10, **kw), shape)
    p2, _ = _abstract_variables(make_model(name, 10, width=2.0, **kw), shape)
    flat1 = dict(jax.tree_util.tree_flatten_with_path(p1)[0])
    flat2 = dict(jax.tree_util.tree_flatten_with_path(p2)[0])
    assert flat1.keys() == flat2.keys()
    for path, a in flat1.items():
        b = flat2[path]
        key = jax.tree_util.keystr(path)
        first_layer = key.startswith(("['dense0']", "['conv0']", "['stem']"))
        is_head_dense = "['head']['dense']" in key
        expected = list(a.shape)
        if a.ndim == 1:  # bias / BN: one per output unit; the head's output units are the classes
            expected[0] *= 1 if (is_head_dense and key.endswith("['bias']")) else 2
        else:
            if not (first_layer and a.ndim == 4) and not (name == "mlp" and key.startswith("['dense0']")):
                expected[-2] *= 2  # input channels, except the image / flattened pixels
            if not is_head_dense:
                expected[-1] *= 2  # output channels, except the classes
        assert list(b.shape) == expected, f"{name} {key}: {a.shape} -> {b.shape}, expected {tuple(expected)}"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow if n == "densenet100" else ()) for n in sorted(MODELS)])  # CI time
def test_layer_names_are_the_top_level_keys(name):
    model = make_model(name, 10)
    params, stats = _abstract_variables(model, INPUT.get(name, CIFAR))
    names = model.layer_names()
    assert names[-1] == "head" and len(set(names)) == len(names)
    assert set(params) == set(names)
    assert set(stats) <= set(names)
    # forward order: indices are consecutive within each family (stage1_block0, 1, ...; conv0, conv1, ...)
    if name.startswith(("resnet", "wrn")):
        n = (model.depth - 2) // 6 if isinstance(model, ResNet) else (model.depth - 4) // 6  # wrn32_4 is a wide ResNet-32
        assert names == ("stem",) + tuple(f"stage{s}_block{b}" for s in (1, 2, 3) for b in range(n)) + ("head",)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _grads_and_logits(model, params, stats, x, y, frozen, train=True):
    def loss(p):
        logits, _ = apply_model(model, p, stats, x, train=train, frozen=frozen)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y]), logits

    return jax.grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("name,kw,frozen", [("mlp", {}, 1), ("mlp", {}, 2), ("cnn", {}, 2), ("resnet", {"depth": 8}, 3)])
def test_frozen_prefix_has_zero_gradients_and_same_forward(name, kw, frozen):
    """The first ``frozen`` layers of ``layer_names()`` (forward order) get exactly zero gradient, the rest do
    not; in eval mode the output is unchanged; in train mode the frozen layers' BN statistics stay put."""
    shape = INPUT.get(name, (4, 8, 8, 3))
    apply = jax.jit(apply_model, static_argnums=0, static_argnames=("train", "frozen"))
    model = make_model(name, 10, **kw)
    params, stats = init_variables(model, jax.random.key(0), shape)
    x = jax.random.normal(jax.random.key(1), shape)
    y = jnp.arange(shape[0]) % 10
    grads, _ = _grads_and_logits(model, params, stats, x, y, frozen)
    names = model.layer_names()
    for i, layer in enumerate(names):
        norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[layer])]
        if i < frozen:
            assert max(norms) == 0.0, f"{layer} is frozen but has gradient {max(norms)}"
        else:
            assert max(norms) > 0.0, f"{layer} is trainable but has zero gradient"
    # eval-mode forward is unchanged by freezing (freezing only changes training behaviour)
    out0, _ = apply(model, params, stats, x, train=False)
    outk, _ = apply(model, params, stats, x, train=False, frozen=frozen)
    np.testing.assert_array_equal(np.asarray(out0), np.asarray(outk))
    if stats:
        # frozen layers run in eval mode: their running statistics are not updated
        _, new = apply(model, params, stats, x, train=True, frozen=frozen)
        for i, layer in enumerate(names):
            if layer not in stats:
                continue
            same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stats[layer]), jax.tree.leaves(new[layer])))
            assert same == (i < frozen), f"{layer}: batch stats {'unchanged' if same else 'updated'}, frozen={frozen}"
    else:
        # no BatchNorm: train-mode forward is identical too
        t0, _ = apply(model, params, stats, x, train=True)
        tk, _ = apply(model, params, stats, x, train=True, frozen=frozen)
        np.testing.assert_array_equal(np.asarray(t0), np.asarray(tk))


def test_frozen_out_of_range_errors():
    model = make_model("mlp", 10)
    params, stats = init_variables(model, jax.random.key(0), DIGITS)
    with pytest.raises(ValueError, match=r"frozen must be in \[0, 2\]"):
        apply_model(model, params, stats, jnp.zeros(DIGITS), train=True, frozen=3)


@pytest.mark.parametrize(
    "name,kw,match",
    [
        ("resnet", {"depth": 21}, "depth must be 6n\\+2.*got 21"),
        ("wrn", {"depth": 27}, "depth must be 6n\\+4.*got 27"),
        ("vgg", {"depth": 15}, "VGG depth must be one of \\[11, 13, 16, 19\\], got 15"),
    ],
)
def test_bad_depth_raises_clear_error(name, kw, match):
    model = make_model(name, 10, **kw)
    with pytest.raises(ValueError, match=match):
        model.layer_names()
    with pytest.raises(ValueError, match=match):
        _abstract_variables(model, CIFAR)


def test_unknown_model_lists_available():
    with pytest.raises(ValueError, match="unknown model 'resnet18'") as e:
        make_model("resnet18", 10)
    assert "resnet20" in str(e.value) and "vgg16" in str(e.value)


def test_init_and_apply_boundary():
    model = make_model("cnn", 10)
    params, stats = init_variables(model, jax.random.key(0), DIGITS)
    assert set(stats) == {"conv0", "conv1", "conv2"}  # head has no BN
    x = jax.random.normal(jax.random.key(1), DIGITS)
    logits, new_stats = apply_model(model, params, stats, x, train=True)
    # BN running mean after one train step: 0.9 * 0 + 0.1 * batch mean of the conv output (float64 numpy)
    conv = jax.lax.conv_general_dilated(
        x, params["conv0"]["conv"]["kernel"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(new_stats["conv0"]["bn"]["mean"], 0.1 * np.asarray(conv, np.float64).mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    # eval mode returns the stats unchanged
    _, same = apply_model(model, params, stats, x, train=False)
    assert same is stats
