"""Images/s of a CIFAR ResNet training step, side by side in one run: mergejax fp32, mergejax
bf16 (``dtype=jnp.bfloat16``: fp32 parameters, bf16 compute), N models vmapped into one step
(:func:`mergejax.core.multi.multi_step`) and the same network in PyTorch.

    python benchmarks/speed.py                               # CPU, 2 cores: ~5 min (see below)
    python benchmarks/speed.py --quick                       # ResNet-20, N=4, 1 timed step
    python benchmarks/speed.py --steps 50 --repeats 3        # GPU (needs a CUDA torch for the PyTorch rows)
    python benchmarks/speed.py --models resnet20 --ns 4 8 16 --steps 5

Every step is forward + backward + SGD update (momentum 0.9, weight decay 5e-4, softmax
cross-entropy) on a random batch of shape (B, 32, 32, 3): ResNet-20 with B=128, ResNet-110
with B=64 (``--batch`` overrides both). A vmapped row trains N models on N batches of B, so
its images/s count N*B per step. Each variant is called once first ("first call s": compile +
one step; PyTorch: one warm-up step), then rounds alternate the variants (A/B/C/A/B/C...) and
the fastest round counts: the machine may be shared and noise only ever makes a round slower.

Defaults: 3 rounds; on an accelerator both models, N = 4 and 8, 30 timed steps. On CPU (to stay
near 8 minutes on 2 cores): 2 timed steps for ResNet-20 and 1 for ResNet-110, and N = 4 and 8
for ResNet-20 only (a vmapped step of N convnets runs as one grouped convolution, which XLA:CPU
executes several times slower than N separate steps; ``--ns 4 8`` runs them for ResNet-110 too).

PyTorch: the same architecture (conv-BN-ReLU stem, BasicBlocks with a 1x1 conv + BN projection
where the shape changes, as ``mergejax/core/models/resnet.py``; global average pool + Linear),
``torch.optim.SGD`` with the same settings. On CPU plain fp32 (eager); on CUDA fp32 and
channels_last + ``torch.autocast`` (bf16 where supported, else fp16 with a GradScaler). Its
parameter count is checked against mergejax's before anything is timed.

FLOPs are XLA's count of the lowered mergejax step (:func:`mergejax.cost.step_flops`; the
PyTorch rows reuse the fp32 count of the same network, a vmapped row counts N times the solo
step). TFLOP/s = FLOPs x steps/s; % peak uses :data:`mergejax.cost.PEAK_TFLOPS` (fp32 rows
against the TF32 tensor-core peak: XLA and cuDNN use TF32 for fp32 convolutions by default);
on CPU the peak is unknown and the column stays empty. Writes
``benchmarks/results/speed_<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import cost, report
from mergejax.core.models import count_params, make_model
from mergejax.core.multi import multi_step, stack_states
from mergejax.core.optim import make_optimizer
from mergejax.core.train import STEP_STATIC, create_state, train_step

#: Default batch per model (the papers' CIFAR settings for these depths on one GPU).
BATCH = {"resnet20": 128, "resnet110": 64}
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
IMAGE = (32, 32, 3)
NUM_CLASSES = 10


# --- PyTorch reference ---------------------------------------------------------------------


def torch_resnet(depth: int, num_classes: int = NUM_CLASSES):
    """PyTorch CIFAR ResNet-``depth`` with mergejax's layout: stem conv3x3(16)-BN-ReLU, 3 stages of
    (depth-2)/6 BasicBlocks (16/32/64 channels, stride 2 at the start of stages 2 and 3, a
    1x1 conv + BN projection shortcut where the shape changes), global average pool, Linear.
    Input (B, 3, 32, 32) -> (B, num_classes). BatchNorm momentum 0.1 / eps 1e-5 = Flax 0.9 / 1e-5."""
    import torch
    from torch import nn

    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")

    def conv(cin, cout, k, s):
        c = nn.Conv2d(cin, cout, k, s, padding=k // 2, bias=False)
        nn.init.kaiming_normal_(c.weight, mode="fan_out", nonlinearity="relu")  # mergejax conv_init
        return c

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1, self.bn1 = conv(cin, cout, 3, stride), nn.BatchNorm2d(cout)
            self.conv2, self.bn2 = conv(cout, cout, 3, 1), nn.BatchNorm2d(cout)
            self.proj = (nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.proj(x) + self.bn2(self.conv2(y)))

    n = (depth - 2) // 6
    layers, cin = [conv(3, 16, 3, 1), nn.BatchNorm2d(16), nn.ReLU()], 16
    for stage, cout in enumerate((16, 32, 64)):
        for b in range(n):
            layers.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_param_count(depth: int) -> int:
    return sum(p.numel() for p in torch_resnet(depth).parameters())


def jax_param_count(name: str) -> int:
    model = make_model(name, NUM_CLASSES)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *IMAGE)), train=False))
    return count_params(variables["params"])


def torch_runner(depth: int, batch: int, amp: str | None, device: str, seed: int = 0):
    """``run(k)``: k PyTorch SGD steps (forward, backward, update) on one random batch, synchronised.
    ``amp``: None (fp32), 'bf16' or 'fp16' (autocast + channels_last; fp16 with a GradScaler)."""
    import torch

    torch.manual_seed(seed)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # autotune conv algorithms for these fixed shapes (the warm-up pays for it)
    model = torch_resnet(depth).to(device)
    fmt = torch.channels_last if amp else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    x = torch.randn(batch, IMAGE[2], *IMAGE[:2], device=device).to(memory_format=fmt)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device) if amp == "fp16" else None  # bf16 needs no loss scaling
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(k):
        for _ in range(k):
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return run


# --- mergejax ------------------------------------------------------------------------------


def jax_runner(name: str, batch: int, n: int, model_kwargs: dict, seed: int = 0):
    """``(run, first_s)``: ``run(k)`` takes k compiled mergejax train steps of ``name`` and
    blocks (``first_s``: the first call, compile + one step). n == 1 is the plain jitted
    ``train_step``, n > 1 the vmapped ``multi_step`` over n models (n batches of ``batch``)."""
    model = make_model(name, NUM_CLASSES, **model_kwargs)
    tx = make_optimizer("sgd", LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, *IMAGE)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
    states = [create_state(model, jax.random.key(seed + i), (1, *IMAGE), tx) for i in range(n)]
    if n == 1:
        state, data, keys = states[0], {"image": images, "label": labels}, jax.random.key(seed)
        step = jax.jit(train_step, donate_argnums=0, static_argnames=STEP_STATIC)
    else:
        state = stack_states(states)
        data = {"image": np.stack([images] * n), "label": np.stack([labels] * n)}
        keys = jax.random.split(jax.random.key(seed), n)
        step = multi_step()
    data = jax.device_put(data)
    holder = {"state": state}

    def run(k):
        s = holder["state"]
        for _ in range(k):
            s, metrics = step(s, data, keys)
        holder["state"] = jax.block_until_ready(s)
        return float(np.mean(metrics["loss"]))

    t0 = time.perf_counter()
    run(1)  # compiles
    return run, time.perf_counter() - t0


def has_dtype(name: str) -> bool:
    """Whether ``make_model(name, ..., dtype=...)`` is accepted (the bf16 rows need it)."""
    try:
        make_model(name, NUM_CLASSES, dtype=jnp.bfloat16)
    except TypeError:
        return False
    return True


# --- table ---------------------------------------------------------------------------------


def peak_tflops(device_kind: str, precision: str) -> float | None:
    """Vendor peak TFLOP/s from :data:`mergejax.cost.PEAK_TFLOPS` for ``precision`` ('fp32' rows use
    the TF32 peak, 'bf16'/'fp16' the bf16 one), or None where the device is not listed (CPUs,
    PCIe cards). H200 has H100 SXM's GH100 compute (the datasheets list the same TFLOP/s)."""
    kind = device_kind.upper()
    if "PCIE" in kind:
        return None
    prefix = next((p for key, p in (("H100", "H100 SXM"), ("H200", "H100 SXM"), ("A100", "A100 SXM")) if key in kind), None)
    if prefix is None:
        return None
    return cost.PEAK_TFLOPS.get(f"{prefix} {'tf32' if precision == 'fp32' else 'bf16'}")


CPU_CAVEAT = ("On a shared CPU the PyTorch column is not reliable: torch's intra-op thread pool slows far more than "
              "XLA's when other jobs take the cores (PyTorch ResNet-20 steps ranged 0.29-3.4 s across runs on this "
              "machine); compare the mergejax rows with each other. vmapped N models on CPU run each conv as a grouped "
              "convolution (feature_group_count=N), which XLA:CPU executes slowly. The GPU goals (one model at least as "
              "fast as PyTorch AMP; 8 vmapped ResNet-20s at least 4x one) need a GPU run.\n\n")


def table_rows(results: list[dict]) -> list[dict]:
    """Markdown-ready rows of ``results`` (dicts with ``model, impl ('mergejax'|'PyTorch'),
    precision ('fp32'|'bf16'|'fp16'), n (models per step), batch, step_s (None: skipped),
    flops (per step, or None), cpu_s (process CPU time per step, optional), peak_tflops (or None), first_s, note``) plus three ratio
    columns, each filled where it applies, on images/s within one model:

    * ``bf16/fp32``: a reduced-precision solo row over the same implementation's fp32 row;
    * ``vmapped/solo``: an N-model mergejax row over the mergejax fp32 solo row;
    * ``mergejax/PyTorch``: a solo mergejax row over the PyTorch row of the same precision
      class (fp32 with fp32, bf16 with PyTorch's autocast row).
    """
    def ips(r):
        return r["n"] * r["batch"] / r["step_s"] if r.get("step_s") else None

    def find(model, impl, low, n=1):
        return next((r for r in results if r["model"] == model and r["impl"] == impl and r["n"] == n
                     and (r["precision"] != "fp32") == low and r.get("step_s")), None)

    def ratio(r, other):
        return ips(r) / ips(other) if other is not None and ips(r) is not None else ""

    rows = []
    for r in results:
        low = r["precision"] != "fp32"
        label = f"{r['impl']} {r['precision']}" + (f" vmapped N={r['n']}" if r["n"] > 1 else "")
        speed = ips(r)
        tflops = r["flops"] * r["n"] / r["step_s"] / 1e12 if speed and r.get("flops") else None
        peak = r.get("peak_tflops")
        rows.append({
            "model": r["model"],
            "variant": label,
            "batch": r["batch"] if r["n"] == 1 else f"{r['n']}x{r['batch']}",
            "images/s": speed if speed is not None else "",
            "step ms": 1e3 * r["step_s"] if speed else "",
            "CPU s/step": r["cpu_s"] if speed and r.get("cpu_s") is not None else "",
            "first call s": r.get("first_s") if r.get("first_s") is not None else "",
            "GFLOP/step": r["flops"] * r["n"] / 1e9 if r.get("flops") else "",
            "TFLOP/s": tflops if tflops is not None else "",
            "% peak": 100 * tflops / peak if tflops is not None and peak else "",
            "bf16/fp32": ratio(r, find(r["model"], r["impl"], False)) if low and r["n"] == 1 else "",
            "vmapped/solo": ratio(r, find(r["model"], "mergejax", False)) if r["n"] > 1 else "",
            "mergejax/PyTorch": (ratio(r, find(r["model"], "PyTorch", low))
                                 if r["impl"] == "mergejax" and r["n"] == 1 else ""),
            "note": r.get("note", ""),
        })
    return rows


def _readable(v):
    """A table cell: floats to 3-4 significant digits without exponents, the rest as is."""
    if not isinstance(v, float):
        return v
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"


def summary(rows: list[dict]) -> str:
    """One line per model with its ratios, e.g. ``resnet20: bf16/fp32 1.8, vmapped N=4/solo 1.1``."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        parts = []
        for r in rows:
            if r["model"] != model:
                continue
            for col in ("bf16/fp32", "vmapped/solo", "mergejax/PyTorch"):
                if r[col] != "":
                    parts.append(f"{r['variant']}: {col} {r[col]:.2f}")
        lines.append(f"{model}: " + ("; ".join(parts) if parts else "no ratios"))
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20,resnet110", help="comma-separated CIFAR ResNets (resnet<6n+2>)")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps per round (default: CPU 2 for resnet20, 1 deeper; accelerator 30)")
    p.add_argument("--repeats", type=int, default=0, help="alternating rounds, fastest counts (default 3)")
    p.add_argument("--ns", type=int, nargs="*", default=None,
                   help="vmapped model counts (default 4 8; CPU: none for nets deeper than resnet20)")
    p.add_argument("--batch", type=int, default=0, help="batch per model (default: resnet20 128, resnet110 64)")
    p.add_argument("--quick", action="store_true", help="resnet20, N=4, 1 timed step, 1 round (a smoke run)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    if args.quick:
        args.models, args.steps, args.repeats, args.ns = "resnet20", 1, 1, args.ns or [4]
    repeats = args.repeats or 3
    device_kind = jax.devices()[0].device_kind
    torch_device, torch_version, amp, torch_skip = "cpu", None, None, None
    if args.no_torch:
        torch_skip = "--no-torch"
    elif not torch_available():
        torch_skip = "PyTorch not installed: pip install -e .[bench]"
    else:
        import torch

        torch_version = torch.__version__
        if not on_cpu and torch.cuda.is_available():
            torch_device = "cuda"
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif not on_cpu:  # a CPU-only torch against an accelerator would compare two different machines
            torch_skip = f"torch {torch_version} has no CUDA (install a CUDA wheel)"
    if torch_skip:
        print(f"{torch_skip}: PyTorch rows skipped", flush=True)

    results = []
    for name in args.models.split(","):
        if not name.startswith("resnet") or not name[6:].isdigit():
            raise SystemExit(f"unknown benchmark model {name!r}; expected a CIFAR ResNet such as resnet20 or resnet110")
        depth = int(name[6:])
        batch = args.batch or BATCH.get(name, 64)
        steps = args.steps or ((2 if depth <= 20 else 1) if on_cpu else 30)
        ns = args.ns if args.ns is not None else ([4, 8] if not on_cpu or depth <= 20 else [])
        fp32_flops = cost.step_flops(name, {}, IMAGE, NUM_CLASSES, batch)
        base = {"model": name, "batch": batch, "first_s": None, "note": ""}
        variants = []  # (result dict, run)

        def add(result, run):
            results.append(result)
            if run is not None:
                variants.append((result, run))
            print(f"{name}: {result['impl']} {result['precision']} n={result['n']}" + (" ready" if run else "")
                  + (f" (first call {result['first_s']:.1f} s)" if result.get("first_s") else "")
                  + (f" {result['note']}" if result.get("note") else ""), flush=True)

        run, comp = jax_runner(name, batch, 1, {})
        add({**base, "impl": "mergejax", "precision": "fp32", "n": 1, "flops": fp32_flops,
             "peak_tflops": peak_tflops(device_kind, "fp32"), "first_s": comp}, run)
        if has_dtype(name):
            kw = {"dtype": jnp.bfloat16}
            run, comp = jax_runner(name, batch, 1, kw)
            add({**base, "impl": "mergejax", "precision": "bf16", "n": 1,
                 "flops": cost.step_flops(name, kw, IMAGE, NUM_CLASSES, batch),
                 "peak_tflops": peak_tflops(device_kind, "bf16"), "first_s": comp}, run)
        else:
            add({**base, "impl": "mergejax", "precision": "bf16", "n": 1, "flops": None, "peak_tflops": None,
                 "step_s": None, "note": "skipped: model has no dtype"}, None)
        for n in ns:
            run, comp = jax_runner(name, batch, n, {})
            add({**base, "impl": "mergejax", "precision": "fp32", "n": n, "flops": fp32_flops,
                 "peak_tflops": peak_tflops(device_kind, "fp32"), "first_s": comp}, run)
        if not torch_skip:
            pj, pt = jax_param_count(name), torch_param_count(depth)
            if pj != pt:
                raise SystemExit(f"{name}: PyTorch model has {pt} parameters, mergejax {pj}: not the same network")
            print(f"{name}: parameter count mergejax {pj} == PyTorch {pt}", flush=True)
            for precision in ["fp32"] + ([amp] if amp else []):
                run = torch_runner(depth, batch, None if precision == "fp32" else precision, torch_device)
                t0 = time.perf_counter()
                run(2)  # warm-up: cuDNN autotuning (cudnn.benchmark on CUDA), the allocator
                add({**base, "impl": "PyTorch", "precision": precision, "n": 1, "flops": fp32_flops,
                     "peak_tflops": peak_tflops(device_kind, precision) if torch_device == "cuda" else None,
                     "first_s": time.perf_counter() - t0, "note": f"torch {torch_version} {torch_device}"}, run)
        elif not args.no_torch:
            add({**base, "impl": "PyTorch", "precision": "fp32", "n": 1, "flops": None, "peak_tflops": None,
                 "step_s": None, "note": f"skipped: {torch_skip}"}, None)

        for r, _ in variants:
            r["rounds_s"], r["rounds_cpu_s"] = [], []
        for _ in range(repeats):  # A/B/C/A/B/C: drifting load hits every variant
            for r, run in variants:
                t0, c0 = time.perf_counter(), time.process_time()
                r["loss"] = run(steps)
                r["rounds_s"].append((time.perf_counter() - t0) / steps)
                r["rounds_cpu_s"].append((time.process_time() - c0) / steps)
        for r, _ in variants:
            r["step_s"], r["cpu_s"], r["steps"] = min(r["rounds_s"]), min(r["rounds_cpu_s"]), steps
            print(f"{name}: {r['impl']} {r['precision']} n={r['n']}: {r['n'] * batch / r['step_s']:.1f} images/s "
                  f"(rounds {', '.join(f'{1e3 * t:.0f}' for t in r['rounds_s'])} ms/step)", flush=True)

    rows = table_rows(results)
    cores = os.cpu_count()
    device = (f"{device_kind} ({jax.device_count()} x {jax.default_backend()}); host {cpu_model()}, {cores} cores; "
              f"jax {jax.__version__}; torch {torch_version or 'not installed'}"
              + (f" on {torch_device} ({'fp32' + (', AMP ' + amp if amp else '')})" if torch_version else ""))
    header = (
        f"Device: {device}.\n\n"
        f"Images/s of one training step (forward, backward, SGD momentum update) on random (B, 32, 32, 3) "
        f"batches; fastest of {repeats} alternating rounds (variants interleaved A/B/C/A/B/C; the machine may be "
        f"shared with other jobs, so the fastest round is the least disturbed). GFLOP/step: XLA's count of the "
        f"lowered mergejax step (PyTorch rows: the same network's fp32 count; vmapped: N x solo). % peak: against "
        f"mergejax.cost.PEAK_TFLOPS (fp32 rows: TF32 peak){'; CPU: peak unknown' if on_cpu else ''}. "
        f"CPU s/step: process CPU time (all threads) per step, fastest round; less sensitive to other jobs than "
        f"wall time. Ratios are of images/s within a model.\n\n"
        + (CPU_CAVEAT if on_cpu else "")
    )
    table = header + report.markdown_table([{k: _readable(v) for k, v in r.items()} for r in rows]) + "\n" + summary(rows).replace("\n", "  \n") + "\n"
    print("\n" + table)
    stem = os.path.join(args.out, f"speed_{device_kind.replace(' ', '_').replace('/', '_').lower()}")
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".md", "w") as f:
        f.write(table)
    report.write_json(stem + ".json", {"device": device, "device_kind": device_kind, "cpu": cpu_model(), "cores": cores,
                                        "jax": jax.__version__, "torch": torch_version, "torch_device": torch_device,
                                        "repeats": repeats, "results": results, "rows": rows, "args": vars(args)})
    return rows


if __name__ == "__main__":
    main()
