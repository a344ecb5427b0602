"""Shared fixtures: the digits splits (loaded once) and a runner for fresh Python processes
(for tests that need their own JAX configuration, e.g. 8 simulated CPU devices)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Hermetic tests: entry points called in-process (the CLI) and subprocesses must not turn on a
# persistent compilation cache in the user's home; tests of the cache pass their own path.
os.environ["MERGEJAX_COMPILATION_CACHE"] = "off"

def params_slow(cases, ids, slow):
    """``pytest.param`` of each case, those whose id is in ``slow`` marked slow (CI time: the default
    run keeps one representative of each kind; ``python -m pytest -q -m slow`` runs the rest)."""
    return [pytest.param(*c, id=i, marks=pytest.mark.slow if i in slow else ()) for c, i in zip(cases, ids)]


# One small instance of every model family: (name, make_model kwargs, input shape (B, H, W, C)).
MODEL_CASES = [
    ("mlp", {}, (4, 8, 8, 1)),
    ("cnn", {}, (4, 8, 8, 1)),
    ("resnet20", {}, (4, 16, 16, 3)),
    ("wrn", dict(depth=10, widen=2), (4, 16, 16, 3)),
    ("vgg11", dict(width=0.25), (4, 32, 32, 3)),
]


def teacher_variables(name: str, kw: dict, shape: tuple, seed: int):
    """``(model, {'params', 'batch_stats'})`` of a freshly initialised model with distinct,
    non-trivial BatchNorm statistics and affine parameters per seed (so a wrong permutation,
    concatenation or compression of them shows up)."""
    import jax

    from mergejax.core.models import init_variables, make_model
    from mergejax.core.units import variables_of

    model = make_model(name, 10, **kw)
    params, stats = init_variables(model, jax.random.key(seed), shape)
    k = jax.random.key(100 + seed)
    stats = jax.tree.map(lambda x: x + jax.random.uniform(k, x.shape), stats)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.3 * jax.random.normal(jax.random.fold_in(k, len(str(p))), x.shape)
        if str(p[-1].key) in ("scale", "bias") else x, params)
    return model, variables_of(params, stats)


def load_experiment(name: str):
    """``experiments/<name>.py`` as a module (the scripts are not a package; each loads its own
    config file by path)."""
    import importlib.util

    key = f"mergejax_test_experiments.{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # as an import does: main() finds its module there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def digits():
    """``(train, test)`` splits of the bundled digits dataset."""
    from mergejax.core import data

    return data.load("digits", "train"), data.load("digits", "test")


@pytest.fixture
def run_python():
    """``run_python(code, env={...}, timeout=s) -> CompletedProcess``: run ``code`` in a fresh
    interpreter (cwd = repo root); raises with its stderr if it fails."""

    def run(code: str, *, env: dict | None = None, timeout: float = 300, check: bool = True):
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=full_env,
            capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"subprocess failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
        return proc

    return run
