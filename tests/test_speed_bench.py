"""benchmarks/speed.py and benchmarks/xla_cpu_flags.py without timing anything: the PyTorch
reference is the same network as mergejax's ResNet (parameter shapes, against a closed-form
count), and the table builders turn synthetic timings into the stated ratio columns."""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from mergejax.core.models import make_model

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


speed = _load("speed")
xla_flags = _load("xla_cpu_flags")


def _closed_form_params(depth, classes=10):
    """CIFAR ResNet-depth with 1x1 conv + BN projections (option B): convs, BN scale+bias, Dense."""
    n, total, cin = (depth - 2) // 6, 27 * 16 + 2 * 16, 16
    for stage, c in enumerate((16, 32, 64)):
        for b in range(n):
            total += 9 * cin * c + 9 * c * c + 4 * c
            if cin != c:
                total += cin * c + 2 * c
            cin = c
    return total + 64 * classes + classes


def _flax_shapes_as_torch(params):
    """Parameter shapes in PyTorch's layout: conv HWIO -> OIHW, Dense (I, O) -> (O, I)."""
    shapes = []
    for leaf in jax.tree.leaves(params):
        s = tuple(leaf.shape)
        shapes.append((s[3], s[2], s[0], s[1]) if len(s) == 4 else (s[1], s[0]) if len(s) == 2 else s)
    return sorted(shapes)


def test_torch_resnet20_is_mergejax_resnet20():
    pytest.importorskip("torch")
    assert _closed_form_params(20) == 272_474  # the 0.27M of He et al. Table 6 (option B projections here)
    model = make_model("resnet20", 10)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]
    torch_model = speed.torch_resnet(20)
    assert speed.jax_param_count("resnet20") == speed.torch_param_count(20) == _closed_form_params(20)
    assert _flax_shapes_as_torch(params) == sorted(tuple(p.shape) for p in torch_model.parameters())
    import torch

    assert torch_model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def _result(impl, precision, step_s, n=1, batch=128, flops=1e12, peak=None, model="resnet20"):
    return {"model": model, "impl": impl, "precision": precision, "n": n, "batch": batch, "step_s": step_s,
            "flops": flops, "peak_tflops": peak, "first_s": 1.0, "cpu_s": 2 * (step_s or 0), "note": ""}


def test_table_rows_ratio_columns():
    results = [
        _result("mergejax", "fp32", 1.0, peak=4.0),  # 128 images/s, 1 TFLOP/s = 25% of 4
        _result("mergejax", "bf16", 0.4),  # 320 images/s: bf16/fp32 2.5
        _result("mergejax", "fp32", 2.0, n=4),  # 256 images/s: vmapped/solo 2
        _result("mergejax", "fp32", 8.0, n=8),  # 128 images/s: vmapped/solo 1
        _result("PyTorch", "fp32", 1.6),  # 80 images/s: mergejax fp32 / PyTorch = 1.6
        _result("PyTorch", "bf16", 0.8),  # 160 images/s: AMP/fp32 2; mergejax bf16 / PyTorch bf16 = 2
        _result("mergejax", "fp32", 0.5, batch=64, model="resnet110"),
        {**_result("mergejax", "bf16", None, batch=64, model="resnet110"), "note": "skipped: model has no dtype"},
    ]
    rows = speed.table_rows(results)
    by = {(r["model"], r["variant"]): r for r in rows}
    fp32, bf16 = by["resnet20", "mergejax fp32"], by["resnet20", "mergejax bf16"]
    assert fp32["images/s"] == pytest.approx(128) and fp32["TFLOP/s"] == pytest.approx(1.0)
    assert fp32["% peak"] == pytest.approx(25.0) and bf16["% peak"] == ""
    assert bf16["bf16/fp32"] == pytest.approx(2.5) and fp32["bf16/fp32"] == ""
    assert by["resnet20", "mergejax fp32 vmapped N=4"]["vmapped/solo"] == pytest.approx(2.0)
    assert by["resnet20", "mergejax fp32 vmapped N=4"]["batch"] == "4x128"
    assert by["resnet20", "mergejax fp32 vmapped N=4"]["TFLOP/s"] == pytest.approx(2.0)  # 4 x 1e12 per 2 s
    assert by["resnet20", "mergejax fp32 vmapped N=8"]["vmapped/solo"] == pytest.approx(1.0)
    assert fp32["mergejax/PyTorch"] == pytest.approx(1.6)
    assert bf16["mergejax/PyTorch"] == pytest.approx(2.0)
    assert by["resnet20", "PyTorch bf16"]["bf16/fp32"] == pytest.approx(2.0)
    assert by["resnet20", "PyTorch fp32"]["mergejax/PyTorch"] == ""
    # ResNet-110: no PyTorch row and a skipped bf16 row leave their ratios empty, never borrowed from ResNet-20.
    r110, skipped = by["resnet110", "mergejax fp32"], by["resnet110", "mergejax bf16"]
    assert r110["images/s"] == pytest.approx(128) and r110["mergejax/PyTorch"] == ""
    assert skipped["images/s"] == "" and skipped["bf16/fp32"] == "" and skipped["note"].startswith("skipped")
    assert "bf16/fp32 2.50" in speed.summary(rows) and "vmapped/solo 2.00" in speed.summary(rows)


def test_peak_tflops_lookup():
    assert speed.peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == speed.cost.PEAK_TFLOPS["H100 SXM tf32"]
    assert speed.peak_tflops("NVIDIA H200", "bf16") == speed.cost.PEAK_TFLOPS["H100 SXM bf16"]
    assert speed.peak_tflops("NVIDIA A100-SXM4-40GB", "bf16") == speed.cost.PEAK_TFLOPS["A100 SXM bf16"]
    assert speed.peak_tflops("NVIDIA H100 PCIe", "bf16") is None
    assert speed.peak_tflops("cpu", "fp32") is None


def test_xla_flag_rows_ratio_and_numerics():
    def rnd(step_s, loss):
        return {"cnn": {"step_s": step_s, "cpu_s": step_s, "first_s": 1.0, "loss": loss}}

    results = {"default": [rnd(0.05, 1.0), rnd(0.04, 1.0)],  # fastest round counts: 40 ms
               "onednn": [rnd(0.02, 1.0 + 5e-4), rnd(0.03, 1.0 + 5e-4)],
               "fast math": [rnd(0.08, 1.01)],
               "xnnpack off": [{"error": "exit 1: boom"}]}
    rows = {r["option"]: r for r in xla_flags.table_rows(results, rtol=1e-3)}
    assert rows["default"]["ms/step"] == pytest.approx(40) and rows["default"]["default/option"] == pytest.approx(1)
    assert rows["onednn"]["default/option"] == pytest.approx(2.0) and rows["onednn"]["numerics"] == "OK"
    assert rows["fast math"]["default/option"] == pytest.approx(0.5) and rows["fast math"]["numerics"] == "DIFF"
    assert rows["fast math"]["loss diff"] == pytest.approx(0.01)
    assert rows["xnnpack off"]["error"] == "exit 1: boom" and rows["xnnpack off"]["ms/step"] == ""


densenet_bench = _load("densenet")


@pytest.mark.slow  # CI time: DenseNet-40 traced both ways; `python -m pytest -q -m slow` runs it
def test_densenet_bench_counts_the_convolutions_of_each_forward():
    """benchmarks/densenet.py's op count on a compiled training step against the architecture: a DenseNet
    with n layers per block runs F = 1 + 3n + 2 convs forward when fused (stem, one per dense layer and
    transition) and F = 1 + 3 n(n+1)/2 + 2(n+1) per segment (dense layer i reads i+1 segments, a
    transition n+1); the backward adds a kernel gradient per conv and an input gradient for all but the
    stem: 3F - 1 in all. The default (fused=None) is per segment on the CPU, fused elsewhere."""
    from mergejax.core.optim import make_optimizer
    from mergejax.core.train import STEP_STATIC, create_state, train_step

    n = 2
    batch = {"image": jnp.zeros((8, 8, 8, 3)), "label": jnp.zeros((8,), jnp.int32)}
    want = {True: 1 + 3 * n + 2, False: 1 + 3 * n * (n + 1) // 2 + 2 * (n + 1)}
    for fused, forward in want.items():
        model = make_model("densenet40", 10, depth=3 * n + 4, width=0.5, fused=fused)
        state = create_state(model, jax.random.key(0), (1, 8, 8, 3), make_optimizer("sgd", 0.1, momentum=0.9))
        compiled = jax.jit(train_step, static_argnames=STEP_STATIC).lower(state, batch, jax.random.key(1)).compile()
        assert densenet_bench.op_counts(compiled.as_text())["convolutions"] == 3 * forward - 1, fused
        # the default's forward (traced only) is the per-segment one on the CPU, the fused one elsewhere
        jaxpr = str(jax.make_jaxpr(lambda p: state.apply_fn(p, state.batch_stats, batch["image"], train=False))(state.params))
        default = make_model("densenet40", 10, depth=3 * n + 4, width=0.5)
        ref = str(jax.make_jaxpr(lambda p: default.apply({"params": p, "batch_stats": state.batch_stats}, batch["image"]))(state.params))
        same = jaxpr.count("conv_general_dilated") == ref.count("conv_general_dilated")
        assert same == (fused == (jax.default_backend() != "cpu")), fused
