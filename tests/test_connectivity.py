"""Loss barrier (closed form) and the interpolation path's end points."""

import jax
import numpy as np
import optax
import pytest

from mergejax.averaging import connectivity
from mergejax.core import data
from mergejax.core.models import make_model
from mergejax.core.loop import evaluate
from mergejax.core.train import create_state


def test_loss_barrier_closed_form():
    ts = [0.0, 0.25, 0.5, 1.0]
    assert connectivity.loss_barrier([1.0, 1.5, 3.0, 2.0], ts) == pytest.approx(3.0 - 1.5)
    assert connectivity.loss_barrier([1.0, 1.25, 1.5, 2.0], ts) == pytest.approx(0.0, abs=1e-12)  # on the chord
    assert connectivity.loss_barrier([1.0, 0.5, 0.5, 2.0], ts) == pytest.approx(0.0)  # below it: the ends count


def test_interpolation_path_ends_are_the_two_networks():
    r = np.random.default_rng(0)
    split = data.Split(r.normal(size=(40, 8, 8, 1)).astype(np.float32), r.integers(0, 10, 40).astype(np.int32), 10, "random")
    model = make_model("mlp", 10, hidden=(16,))
    a, b = (create_state(model, jax.random.key(s), (1, 8, 8, 1), optax.sgd(0.1)) for s in (0, 1))
    path = connectivity.interpolation_path(a, a.params, b.params, split, [0.0, 0.5, 1.0], batch_size=16)
    assert path["t"] == [0.0, 0.5, 1.0] and len(path["loss"]) == len(path["accuracy"]) == 3
    for i, s in ((0, a), (2, b)):
        e = evaluate(s, split, 16)
        assert path["loss"][i] == pytest.approx(e["loss"], rel=1e-6) and path["accuracy"][i] == e["accuracy"]
    assert path["loss"][1] != pytest.approx(path["loss"][0], rel=1e-3)
