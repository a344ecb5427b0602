"""N models in one vmapped program: each ends where its solo ``fit`` ends (float tolerance)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mergejax.core.loop import fit
from mergejax.core.models import make_model
from mergejax.core.multi import fit_many, stack_states, unstack_states
from mergejax.core.optim import make_optimizer, make_schedule
from mergejax.core.train import create_state


def _state(model, seed, steps):
    lr = make_schedule("cosine", 0.1, steps)
    tx = make_optimizer("sgd", lr, momentum=0.9, weight_decay=5e-4)
    return create_state(model, jax.random.key(100 + seed), (1, 8, 8, 1), tx, lr_fn=lr,
                        augment_fn=None)


@pytest.mark.parametrize("name,kw", [("mlp", {"hidden": (32,)}), ("cnn", {"width": 0.25})])
def test_each_vmapped_model_equals_its_solo_fit(digits, name, kw):
    train, _ = digits
    model, steps, seeds = make_model(name, 10, **kw), 12, (0, 1, 2)
    together, hist = fit_many([_state(model, s, steps) for s in seeds], train, num_steps=steps, batch_size=32,
                              seeds=seeds, log_every=4, progress=False)
    for s, got, h in zip(seeds, together, hist):
        solo, solo_hist = fit(_state(model, s, steps), train, num_steps=steps, batch_size=32, seed=s, log_every=4,
                              progress=False)
        for a, b in zip(jax.tree.leaves(got.arrays()), jax.tree.leaves(solo.arrays())):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
        assert [r["step"] for r in h] == [r["step"] for r in solo_hist] == [4, 8, 12]
        np.testing.assert_allclose([r["loss"] for r in h], [r["loss"] for r in solo_hist], rtol=1e-4)
    # the models really are different (own init and data order), not N copies of one
    assert not np.allclose(together[0].params["head"]["dense"]["kernel"], together[1].params["head"]["dense"]["kernel"])


def test_stack_states_refuses_different_optimizers_and_shapes(digits):
    model = make_model("mlp", 10, hidden=(8,))
    a = _state(model, 0, 10)
    b = create_state(model, jax.random.key(1), (1, 8, 8, 1), make_optimizer("adam", 1e-3))
    with pytest.raises(ValueError, match="state 1 has a different tx"):
        stack_states([a, b])
    with pytest.raises(ValueError, match="state 1 has a different apply_fn"):
        stack_states([a, _state(make_model("mlp", 10, hidden=(9,)), 0, 10)])
    wider = a.replace(params=jax.tree.map(lambda x: np.concatenate([x, x], -1), a.params))
    with pytest.raises(ValueError, match=r"state 1 has leaf \['params'\]\['dense0'\]\['dense'\]\['bias'\] of shape \(16,\)"):
        stack_states([a, wider])
    back = unstack_states(stack_states([a, _state(model, 1, 10)]))
    np.testing.assert_array_equal(back[0].params["head"]["dense"]["kernel"], a.params["head"]["dense"]["kernel"])
