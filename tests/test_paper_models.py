"""The papers' networks: DenseNet-40/100 and DenseNet-BC-76 (snapshot ensembles, FreezeOut),
Wide-ResNet-32 (snapshot ensembles), VGG-11 without BatchNorm (merging).

Parameter counts against hand counts written from the papers' architecture descriptions and
against the papers' printed counts; the unit table against permutation invariance; FreezeOut
stages (frozen prefix); concatenation and compression of two teachers; dropout."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.core.models import DenseNet, apply_model, count_params, init_variables, make_model
from mergejax.core.units import take_units, unit_spec
from mergejax.merging.compress import compress
from mergejax.merging.concat import concat
from mergejax.merging.gates import deterministic, gated_apply

from conftest import params_slow, teacher_variables

NEW = ("densenet40", "densenet100", "densenet_bc76", "wrn32_4", "vgg11_nobn")

# Small instances of every new model: (name, make_model kwargs, input shape). The DenseNets keep
# their kind (basic / BC) with 2 layers per block; WRN-32-4 keeps widen=4 (width 0.25 -> 16/32/64).
CASES = [
    ("densenet40", dict(depth=10, width=0.5), (4, 8, 8, 3)),
    ("densenet100", dict(depth=7, width=0.25), (4, 8, 8, 3)),
    ("densenet_bc76", dict(depth=16, width=0.5), (4, 8, 8, 3)),
    ("wrn32_4", dict(depth=8, width=0.25), (4, 8, 8, 3)),
    ("vgg11_nobn", dict(width=0.125), (4, 32, 32, 3)),
    ("vgg11_nobn", dict(width=0.125, bias=True), (4, 32, 32, 3)),
]
IDS = [f"{n}-bias" if kw.get("bias") else n for n, kw, _ in CASES]


def _abstract_params(model, shape=(1, 32, 32, 3)):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))["params"]


# --- hand counts (conv kernels, BN scale + shift, Dense), from the papers' descriptions ----------


def _densenet_count(depth, k, bottleneck=False, theta=1.0, classes=10):
    """Huang et al. 2017, Sec. 3-4: stem conv3x3 (16, or 2k for BC); 3 blocks of n layers, basic
    BN-ReLU-conv3x3(k) or bottleneck BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); transitions
    BN-ReLU-conv1x1(floor(theta m)); head BN + Linear."""
    n = (depth - 4) // (6 if bottleneck else 3)
    c = 2 * k if bottleneck else 16
    total = 9 * 3 * c
    for b in range(3):
        for _ in range(n):
            total += 2 * c + (c * 4 * k + 2 * 4 * k + 9 * 4 * k * k if bottleneck else 9 * c * k)
            c += k
        if b < 2:
            out = math.floor(theta * c)
            total += 2 * c + c * out
            c = out
    return total + 2 * c + c * classes + classes


def _resnet_count(depth, widen, classes=10):
    """He et al. 2016 CIFAR ResNet, every conv ``widen`` x wider, option-B projections (1x1 conv + BN)."""
    n = (depth - 2) // 6
    c = [16 * widen, 32 * widen, 64 * widen]
    total = 9 * 3 * c[0] + 2 * c[0]
    cin = c[0]
    for s in range(3):
        for _ in range(n):
            total += 9 * cin * c[s] + 2 * c[s] + 9 * c[s] * c[s] + 2 * c[s]
            if cin != c[s]:
                total += cin * c[s] + 2 * c[s]
            cin = c[s]
    return total + cin * classes + classes


def _vgg11_nobn_count(bias=False, classes=10):
    """fmfi-compbio/neural-network-merging cifar10_vgg11/teacher.py: 8 conv3x3 (64, M, 128, M,
    256, 256, M, 512, 512, M, 512, 512, M), ReLU, Linear(512, 10); bias=False throughout."""
    total, cin = 0, 3
    for c in (64, 128, 256, 256, 512, 512, 512, 512):
        total += 9 * cin * c + (c if bias else 0)
        cin = c
    return total + cin * classes + (classes if bias else 0)


@pytest.mark.parametrize(
    "model,hand,paper",
    [
        # Huang et al. 2017 (DenseNet), Table 2 (C10 counts, 10 classes): DenseNet L=40 k=12 1.0M,
        # L=100 k=24 27.2M; DenseNet-BC L=100 k=12 0.8M (as a check of the BC code path).
        (make_model("densenet40", 10), _densenet_count(40, 12), 1.0e6),
        (make_model("densenet100", 10), _densenet_count(100, 24), 27.2e6),
        (DenseNet(10, depth=100, growth=12, bottleneck=True, compression=0.5), _densenet_count(100, 12, True, 0.5), 0.8e6),
        # FreezeOut's DenseNet-BC L=76 k=12: no count printed in the paper; hand count only.
        (make_model("densenet_bc76", 10), _densenet_count(76, 12, True, 0.5), None),
        # Snapshot paper's Wide-ResNet-32 (k=4): no count printed; hand count. Option-B projections add
        # (64*128 + 2*128) + (128*256 + 2*256) = 41,728 (0.56%) to the option-A network.
        (make_model("wrn32_4", 10), _resnet_count(32, 4), None),
        # Merging paper's VGG-11 (authors' teacher.py, no BN, no biases): no count printed.
        (make_model("vgg11_nobn", 10), _vgg11_nobn_count(), None),
        (make_model("vgg11_nobn", 10, bias=True), _vgg11_nobn_count(bias=True), None),
    ],
    ids=["densenet40", "densenet100", "densenet_bc100", "densenet_bc76", "wrn32_4", "vgg11_nobn", "vgg11_nobn_bias"],
)
def test_parameter_counts(model, hand, paper):
    n = count_params(_abstract_params(model))
    assert n == hand, f"{n} parameters, hand count {hand}"
    if paper is not None:
        # The paper prints one decimal in millions: our count must round to the printed value.
        assert round(n / 1e5) == round(paper / 1e5), f"{n} does not round to the paper's {paper / 1e6}M"


def test_layer_names_are_freezeout_layers():
    # FreezeOut's layers (ajbrock/FreezeOut densenet.py): stem conv, each dense layer / bottleneck and
    # transition, then the head (BN + classifier, never frozen). DenseNet-40: 1 + 36 + 2 + 1 = 40 = L.
    for name, per_block in (("densenet40", 12), ("densenet100", 32), ("densenet_bc76", 12)):
        names = make_model(name, 10).layer_names()
        assert names[0] == "stem" and names[-1] == "head"
        assert names[1 : per_block + 2] == tuple(f"block1_layer{i}" for i in range(per_block)) + ("trans1",)
        assert len(names) == 1 + 3 * per_block + 2 + 1
    assert len(make_model("densenet40", 10).layer_names()) == 40
    wrn = make_model("wrn32_4", 10).layer_names()
    assert wrn == ("stem",) + tuple(f"stage{s}_block{b}" for s in (1, 2, 3) for b in range(5)) + ("head",)
    assert make_model("vgg11_nobn", 10).layer_names() == tuple(f"conv{i}" for i in range(8)) + ("head",)
    for name in NEW:
        model = make_model(name, 10)
        assert set(_abstract_params(model)) == set(model.layer_names())


def test_bad_densenet_depth_names_the_rule():
    with pytest.raises(ValueError, match=r"DenseNet-BC depth must be 6n\+4.*got 41"):
        make_model("densenet_bc76", 10, depth=41).layer_names()
    with pytest.raises(ValueError, match=r"DenseNet depth must be 3n\+4.*got 41"):
        make_model("densenet40", 10, depth=41).layer_names()


# --- option-A (parameter-free) shortcuts: the snapshot paper's ResNet-110 and WRN-32-4 -------


@pytest.mark.parametrize("name,count", [
    # Exact option-A counts of the CIFAR ResNets (akamaster/pytorch_resnet_cifar10's 0.27M / 1.7M rows).
    ("resnet20", 269_722), ("resnet110", 1_727_962),
    # WRN-32-4 without its two projections (64*128 + 2*128) + (128*256 + 2*256) = 41,728.
    ("wrn32_4", _resnet_count(32, 4) - 41_728),
])
def test_option_a_parameter_counts(name, count):
    a, b = make_model(name, 10, shortcut="A"), make_model(name, 10)
    params = _abstract_params(a)
    assert count_params(params) == count
    assert a.layer_names() == b.layer_names() and set(params) == set(a.layer_names())  # FreezeOut's layers unchanged
    assert not [k for blk in params.values() for k in blk if k.startswith("proj")]


def test_option_a_block_is_subsample_and_zero_pad():
    from mergejax.core.models.resnet import BasicBlock

    # conv path's last BN: scale 0, bias beta -> the block computes relu(shortcut(x) + beta)
    x = np.random.default_rng(0).normal(size=(2, 7, 7, 3)).astype(np.float32)
    block = BasicBlock(5, strides=2, shortcut="A")
    v = jax.tree.map(lambda a: jnp.ones(a.shape) / 4, jax.eval_shape(block.init, jax.random.key(0), jnp.asarray(x)))
    beta = np.random.default_rng(1).normal(size=5).astype(np.float32)
    v["params"]["bn2"] = {"scale": jnp.zeros(5), "bias": jnp.asarray(beta)}
    out = block.apply(v, jnp.asarray(x))
    ref = np.concatenate([x[:, ::2, ::2], np.zeros((2, 4, 4, 2), np.float32)], axis=-1)  # fb.resnet.torch option A
    np.testing.assert_allclose(np.asarray(out), np.maximum(ref + beta, 0.0), rtol=1e-6, atol=1e-6)
    assert set(v["params"]) == {"conv1", "bn1", "conv2", "bn2"}


def test_option_a_refusals_and_init():
    model = make_model("resnet20", 10, shortcut="A", depth=8, width=0.25)
    init = lambda k: init_variables(model, k, (1, 8, 8, 3))  # noqa: E731
    assert [e for e in jax.make_jaxpr(init)(jax.random.key(0)).eqns if e.params.get("name") == "_init"]  # jitted, no table
    params, stats = jax.eval_shape(init, jax.random.key(0))
    assert count_params(params) == _resnet_count(8, 0.25) - (4 * 8 + 2 * 8) - (8 * 16 + 2 * 16)  # 4/8/16 channels
    with pytest.raises(TypeError, match=r"shortcut='A' has no unit table.*shortcut='B' only"):
        unit_spec(model, {"params": params, "batch_stats": stats})
    with pytest.raises(ValueError, match=r"unknown ResNet shortcut 'C'; use 'A'"):
        make_model("resnet20", 10, shortcut="C").layer_names()
    from mergejax.core.models.resnet import BasicBlock

    with pytest.raises(ValueError, match="shortcut 'A' zero-pads channels, so it cannot map 8 to 4 channels"):
        jax.eval_shape(BasicBlock(4, shortcut="A").init, jax.random.key(0), jnp.zeros((1, 4, 4, 8)))


# --- unit table -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def variables():
    """``variables(name, kw, shape, seed=0) -> (model, variables)``, each initialised once per module
    (initialisation dominates this file's run time)."""
    made = {}

    def get(name, kw, shape, seed=0):
        key = (name, tuple(sorted(kw.items())), shape, seed)
        if key not in made:
            made[key] = teacher_variables(name, kw, shape, seed)
        return made[key]

    return get



@pytest.mark.parametrize("name,kw,shape", params_slow(CASES, IDS, {"densenet40", "densenet100", "vgg11_nobn"}))
def test_permuting_units_preserves_function(variables, name, kw, shape):
    model, v = variables(name, kw, shape)
    spec = unit_spec(model, v)
    rng = np.random.default_rng(0)
    perm = {g: rng.permutation(n) for g, n in spec.groups.items()}
    v2 = take_units(v, spec, perm)
    x = jax.random.normal(jax.random.key(2), shape)
    for train in (False, True):
        a, _ = apply_model(model, v["params"], v["batch_stats"], x, train=train)
        b, _ = apply_model(model, v2["params"], v2["batch_stats"], x, train=train)
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    assert any(jax.tree.leaves(jax.tree.map(lambda p, q: bool(jnp.any(p != q)), v, v2)))


def test_densenet_groups_are_the_concatenation_segments(variables):
    model, v = variables("densenet_bc76", dict(depth=16, width=0.5), (4, 8, 8, 3))
    spec = unit_spec(model, v)
    # stem 2k = 12, growth 6, bottleneck 4k = 24, transitions floor(0.5 (24 + 2 * 12)) = 24 -> 12.
    assert spec.groups["stem"] == 12 and spec.groups["block1_layer1"] == 6
    assert spec.groups["block2_layer0/hidden"] == 24 and spec.groups["trans1"] == 12
    # block1_layer1 reads (stem, block1_layer0); trans1 reads all three segments of block 1.
    assert spec.axes[("params", "block1_layer1", "in1_conv", "kernel")][-2:] == ("block1_layer0", "block1_layer1/hidden")
    assert spec.axes[("batch_stats", "trans1", "in2_bn", "mean")] == ("block1_layer1",)
    assert [p[2] for p in spec.consumers("block1_layer0")] == ["in1_conv", "in1_conv"]
    assert spec.axes[("params", "head", "in0_dense", "bias")] == (None,)


# --- FreezeOut stages -----------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 5))
def _grads(model, params, stats, x, y, frozen):
    def loss(p):
        logits, _ = apply_model(model, p, stats, x, train=True, frozen=frozen)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    return jax.grad(loss)(params)


@pytest.mark.parametrize("name,kw,shape,frozen", params_slow([
    ("densenet40", dict(depth=10, width=0.5), (4, 8, 8, 3), 4),  # stem, 2 layers, trans1
    ("densenet_bc76", dict(depth=16, width=0.5), (4, 8, 8, 3), 2),
    ("wrn32_4", dict(depth=8, width=0.25), (4, 8, 8, 3), 2),
    ("vgg11_nobn", dict(width=0.125), (4, 32, 32, 3), 3),
], ["densenet40", "densenet_bc76", "wrn32_4", "vgg11_nobn"], {"densenet40", "vgg11_nobn"}))
def test_frozen_prefix(variables, name, kw, shape, frozen):
    """Frozen layers get exactly zero gradient and keep their BN statistics; the eval forward
    does not change; without BN the train forward does not change either."""
    model, v = variables(name, kw, shape)
    params, stats = v["params"], v["batch_stats"]
    x = jax.random.normal(jax.random.key(1), shape)
    y = jnp.arange(shape[0]) % 10
    grads = _grads(model, params, stats, x, y, frozen)
    for i, layer in enumerate(model.layer_names()):
        top = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[layer]))
        assert (top == 0.0) == (i < frozen), f"{layer}: max |grad| {top}, frozen={frozen}"
    out0, _ = apply_model(model, params, stats, x, train=False)
    outk, _ = apply_model(model, params, stats, x, train=False, frozen=frozen)
    np.testing.assert_array_equal(np.asarray(out0), np.asarray(outk))
    t0, _ = apply_model(model, params, stats, x, train=True)
    tk, new = apply_model(model, params, stats, x, train=True, frozen=frozen)
    if stats:
        for i, layer in enumerate(model.layer_names()):
            if layer in stats:
                same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stats[layer]), jax.tree.leaves(new[layer])))
                assert same == (i < frozen), f"{layer}: batch stats {'unchanged' if same else 'updated'}"
    else:
        np.testing.assert_array_equal(np.asarray(t0), np.asarray(tk))


# --- merging: concat is the teachers' mean; compress equals the gated big student ------------


MERGE_CASES = [c for c in CASES if c[0] in ("densenet40", "densenet_bc76", "wrn32_4", "vgg11_nobn")]
MERGE_IDS = [f"{n}-bias" if kw.get("bias") else n for n, kw, _ in MERGE_CASES]


def _big(name, kw):
    return make_model(name, 10, **{**kw, "width": kw["width"] * 2})


@pytest.mark.parametrize("name,kw,shape", params_slow(MERGE_CASES, MERGE_IDS, {"densenet40"}))
def test_concat_is_mean_and_compress_keeps_function(variables, name, kw, shape):
    model, va = variables(name, kw, shape, 0)
    _, vb = variables(name, kw, shape, 1)
    spec = unit_spec(model, va)
    big = concat(va, vb, spec)
    bmodel = _big(name, kw)
    bspec = unit_spec(bmodel, big)
    assert bspec.groups == {g: 2 * n for g, n in spec.groups.items()}
    x = jax.random.normal(jax.random.key(7), shape)
    for train in (False, True):
        la, _ = apply_model(model, va["params"], va["batch_stats"], x, train=train)
        lb, _ = apply_model(model, vb["params"], vb["batch_stats"], x, train=train)
        lbig, _ = apply_model(bmodel, big["params"], big["batch_stats"], x, train=train)
        np.testing.assert_allclose(lbig, (la + lb) / 2, atol=3e-5, rtol=1e-4)
    assert float(jnp.abs(la - lb).max()) > 1e-3  # the teachers disagree
    # All gates open, keep every unit: compress leaves the big student's function unchanged.
    open_ = {g: jnp.full((n,), 10.0) for g, n in bspec.groups.items()}
    kept, _ = compress(big, open_, bspec, fraction=1.0)
    for train in (False, True):
        lbig, _ = apply_model(bmodel, big["params"], big["batch_stats"], x, train=train)
        lk, _ = apply_model(bmodel, kept["params"], kept["batch_stats"], x, train=train)
        np.testing.assert_allclose(lk, lbig, atol=3e-5, rtol=1e-4)
    # Half the gates shut, the others open to various degrees: the compressed student (teacher
    # architecture) computes what the gated big student computes.
    rng = np.random.default_rng(0)
    la_ = {}
    for g, n in bspec.groups.items():
        a = np.full(n, -10.0, np.float32)
        k = rng.permutation(n)[: n // 2]
        a[k] = rng.uniform(-1.2, 4.0, len(k))
        la_[g] = jnp.asarray(a)
    student, _ = compress(big, la_, bspec)
    det = {g: deterministic(a) for g, a in la_.items()}
    for train in (False, True):
        want, _ = gated_apply(bmodel, big["params"], big["batch_stats"], x, det, bspec, train=train)
        got, _ = apply_model(model, student["params"], student["batch_stats"], x, train=train)
        np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-4)
    plain, _ = apply_model(bmodel, big["params"], big["batch_stats"], x, train=False)
    want, _ = gated_apply(bmodel, big["params"], big["batch_stats"], x, det, bspec, train=False)
    assert float(jnp.abs(plain - want).max()) > 1e-3  # the gates did act


# --- dropout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kw,shape", params_slow(
    [c for c in CASES if c[0] in ("densenet40", "densenet_bc76", "wrn32_4")], ["densenet40", "densenet_bc76", "wrn32_4"],
    {"densenet40", "densenet_bc76"}))  # the snapshot presets' slow test runs the Dropout column on DenseNet-40
def test_dropout_needs_rng_and_leaves_init_and_eval_alone(name, kw, shape):
    plain = make_model(name, 10, **kw)
    drop = make_model(name, 10, dropout=0.5, **kw)
    p0, s0 = init_variables(plain, jax.random.key(0), shape)
    p1, s1 = init_variables(drop, jax.random.key(0), shape)
    jax.tree.map(np.testing.assert_array_equal, p0, p1)  # same parameters for the same key
    x = jax.random.normal(jax.random.key(1), shape)
    e0, _ = apply_model(plain, p0, s0, x, train=False)
    e1, _ = apply_model(drop, p0, s0, x, train=False)
    np.testing.assert_array_equal(np.asarray(e0), np.asarray(e1))  # eval: no dropout
    t1, _ = apply_model(drop, p0, s0, x, train=True, rng=jax.random.key(2))
    t2, _ = apply_model(drop, p0, s0, x, train=True, rng=jax.random.key(3))
    t0, _ = apply_model(plain, p0, s0, x, train=True)
    assert float(jnp.abs(t1 - t2).max()) > 1e-4 and float(jnp.abs(t1 - t0).max()) > 1e-4
    with pytest.raises(Exception, match="dropout"):
        apply_model(drop, p0, s0, x, train=True)  # no rng: Flax asks for the 'dropout' stream


# --- the fused DenseNet forward ---------------------------------------------------------------


# jitted: one compile per program instead of one eager dispatch compile per op (minutes on a 2-core CPU)
_japply = jax.jit(apply_model, static_argnums=0, static_argnames=("train", "frozen"))
_jgrads = jax.jit(_grads, static_argnums=(0, 5))


@pytest.mark.parametrize("name,kw,shape", [
    pytest.param(*c, marks=pytest.mark.slow)  # CI time (~1 min each on a 2-core CPU); `python -m pytest -q -m slow` runs them
    for c in CASES if c[0] in ("densenet40", "densenet_bc76")], ids=["densenet40", "densenet_bc76"])
def test_fused_densenet_equals_one_conv_per_segment(name, kw, shape):
    """One BatchNorm and one conv over the concatenated segments (the default) against the
    reference path, one nn.BatchNorm and one nn.Conv per (layer, segment) summed: the same
    variables from the same key, the same logits, batch statistics and gradients, in eval and
    training, with synchronised BatchNorm over a 2-device vmap axis too."""
    model = make_model(name, 10, fused=True, **kw)
    ref = model.clone(fused=False)
    p, s = init_variables(ref, jax.random.key(0), shape)
    jax.tree.map(np.testing.assert_array_equal, (p, s), init_variables(model, jax.random.key(0), shape))
    x = 3.0 * jax.random.normal(jax.random.key(4), shape) + 1.0
    # Trained-looking statistics, so eval mode reads non-trivial running moments.
    _, s = _japply(ref, p, s, x, train=True)
    y = jnp.arange(shape[0]) % 10
    for train in (False, True):
        got, got_s = _japply(model, p, s, x, train=train)
        want, want_s = _japply(ref, p, s, x, train=train)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got_s, want_s)
    g_got = _jgrads(model, p, s, x, y, 0)
    g_want = _jgrads(ref, p, s, x, y, 0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * float(jnp.abs(b).max())), g_got, g_want)
    # Synchronised BatchNorm: two halves of the batch on a vmapped axis equal the whole batch.
    half = jnp.stack([x[: shape[0] // 2], x[shape[0] // 2:]])
    for m in (model, ref):
        sync = m.clone(bn_axis_name="b")
        out, st = jax.jit(jax.vmap(lambda xb: apply_model(sync, p, s, xb, train=True), axis_name="b"))(half)
        whole, whole_s = _japply(ref, p, s, x, train=True)
        np.testing.assert_allclose(out.reshape(whole.shape), whole, rtol=1e-4, atol=1e-5 * float(jnp.abs(whole).max()))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6), st, whole_s)


@pytest.mark.slow  # CI time; `python -m pytest -q -m slow` runs it
def test_fused_densenet_mixed_precision_matches_reference():
    """bf16 compute: the fused path casts like nn.BatchNorm / nn.Conv (fp32 moments, bf16 conv)."""
    model = make_model("densenet40", 10, depth=10, width=0.5, dtype=jnp.bfloat16, fused=True)
    p, s = init_variables(model, jax.random.key(0), (4, 8, 8, 3))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    got, got_s = apply_model(model, p, s, x, train=True)
    want, want_s = apply_model(model.clone(fused=False), p, s, x, train=True)
    assert got.dtype == want.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2 * float(jnp.abs(want).max()))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2), got_s, want_s)
