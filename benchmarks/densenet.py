"""The fused DenseNet forward (one BatchNorm and one conv over a layer's concatenated input)
against one ``nn.BatchNorm`` + ``nn.Conv`` per (layer, segment), side by side in one run.

    python benchmarks/densenet.py                          # DenseNet-40, batch 64, 3 timed steps
    python benchmarks/densenet.py --model densenet100 --steps 20 --rounds 3   # on a GPU

Both variants have the same parameters (``DenseNet(fused=...)``). For each: seconds to trace
(lower) and compile one SGD training step (:func:`mergejax.core.train.train_step`), the
convolutions and fusions in the optimised program (on a GPU, roughly its kernel launches) and
the fastest of ``--rounds`` alternating rounds of ``--steps`` steps (the machine may be shared;
noise only ever makes a round slower). Prints the ratios and writes
``benchmarks/results/densenet_<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import report
from mergejax.core.models import make_model
from mergejax.core.optim import make_optimizer
from mergejax.core.train import STEP_STATIC, create_state, train_step


def op_counts(hlo_text: str) -> dict:
    """Convolutions and fusions (``fusion`` instructions, not their bodies) in optimised HLO text."""
    return {"convolutions": len(re.findall(r"= \S+ convolution\(", hlo_text)) + hlo_text.count('custom_call_target="__cudnn$conv'),
            "fusions": len(re.findall(r"= \S+ fusion\(", hlo_text))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="densenet40", choices=["densenet40", "densenet100", "densenet_bc76"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(args.batch, 32, 32, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)}
    tx = make_optimizer("sgd", 0.1, momentum=0.9)
    runs = {}
    for fused in (True, False):
        model = make_model(args.model, 10, fused=fused)
        state = create_state(model, jax.random.key(0), (1, 32, 32, 3), tx)
        t0 = time.perf_counter()
        lowered = jax.jit(train_step, static_argnames=STEP_STATIC).lower(state, batch, jax.random.key(1))
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        jax.block_until_ready(compiled(state, batch, jax.random.key(1)))
        runs[fused] = {"step": compiled, "state": state, "trace s": t1 - t0, "compile s": t2 - t1,
                       **op_counts(compiled.as_text()), "best step s": float("inf")}
    for _ in range(args.rounds):
        for fused, run in runs.items():
            t0 = time.perf_counter()
            for i in range(args.steps):
                out = run["step"](run["state"], batch, jax.random.key(i))
            jax.block_until_ready(out)
            run["best step s"] = min(run["best step s"], (time.perf_counter() - t0) / args.steps)
    rows = [{"forward": "fused" if fused else "per segment", **{k: v for k, v in run.items() if k not in ("step", "state")},
             "images/s": args.batch / run["best step s"]} for fused, run in runs.items()]
    ratio = {k: runs[False][k] / runs[True][k] for k in ("trace s", "compile s", "best step s", "convolutions", "fusions")}
    device = jax.devices()[0].device_kind
    table = (f"`{args.model}`, batch {args.batch}, SGD training step, best of {args.rounds} rounds of {args.steps} "
             f"steps, device {device}.\n\n" + report.markdown_table(rows, floatfmt=".3g") +
             "\n\nper segment / fused: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()) + "\n")
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"densenet_{device.replace(' ', '_').lower()}")
    with open(stem + ".md", "w") as f:
        f.write(table)
    report.write_json(stem + ".json", {"rows": rows, "per_segment_over_fused": ratio, "args": vars(args), "device": device})


if __name__ == "__main__":
    main()
