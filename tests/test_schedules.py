"""Cyclic schedules against their closed forms (numpy float64) at every step, boundaries included."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mergejax.core import optim as schedules

ATOL = 2e-7  # float32 schedule vs float64 reference, lr <= 0.2


def _values(fn, n):
    """The schedule at counts 0..n-1 via one vmapped call (what jit sees) and eagerly at a few."""
    vals = np.asarray(jax.jit(jax.vmap(fn))(jnp.arange(n)), np.float64)
    for c in (0, n // 2, n - 1):
        np.testing.assert_allclose(float(fn(c)), vals[c], atol=1e-7)
    return vals


def _eq2(alpha0, T, M):
    """Huang et al. Eq. 2 literally, t = 1..T, float64."""
    t = np.arange(1, T + 1, dtype=np.float64)
    L = math.ceil(T / M)
    return alpha0 / 2 * (np.cos(np.pi * np.mod(t - 1, L) / L) + 1)


@pytest.mark.parametrize("alpha0,T,M", [(0.1, 100, 5), (0.2, 60, 6), (0.2, 7, 7), (0.1, 40, 1)])
def test_snapshot_cosine_is_eq2_when_divisible(alpha0, T, M):
    np.testing.assert_allclose(_values(schedules.snapshot_cosine(alpha0, T, M), T), _eq2(alpha0, T, M), atol=ATOL)
    # and optax's sgdr with M identical cycles (reference file)
    sgdr = optax.sgdr_schedule([dict(init_value=alpha0, peak_value=alpha0, warmup_steps=0, decay_steps=T // M, end_value=0.0)] * M)
    np.testing.assert_allclose(_values(schedules.snapshot_cosine(alpha0, T, M), T), _values(sgdr, T), atol=ATOL)


@pytest.mark.parametrize("T,M", [(10, 3), (10, 4), (10, 6), (101, 5), (23, 22)])
def test_snapshot_cosine_not_divisible(T, M):
    alpha0 = 0.2
    vals = _values(schedules.snapshot_cosine(alpha0, T, M), T)
    # hand-written lengths: the first M - T%M cycles have floor(T/M) steps... any split works
    # as long as lengths differ by <= 1 and sum to T; our split is s_i = floor(i T / M)
    starts = [math.floor(i * T / M) for i in range(M + 1)]
    lengths = np.diff(starts)
    assert lengths.sum() == T and lengths.max() - lengths.min() <= 1 and lengths.min() >= 1
    ref = np.concatenate([alpha0 / 2 * (np.cos(np.pi * np.arange(L) / L) + 1) for L in lengths])
    np.testing.assert_allclose(vals, ref, atol=ATOL)
    # exactly M restarts at alpha0, each at a cycle start; the step before a restart is the
    # cycle's smallest lr (< alpha0 / 2 even for 2-step cycles)
    restarts = np.flatnonzero(np.isclose(vals, alpha0, atol=1e-7))
    assert list(restarts) == starts[:-1]
    for s, L in zip(starts[1:], lengths):
        assert vals[s - 1] == pytest.approx(alpha0 / 2 * (np.cos(np.pi * (L - 1) / L) + 1), abs=ATOL)
        if L > 1:
            assert vals[s - 1] < alpha0 / 2
    assert schedules.snapshot_boundaries(T, M) == tuple(starts[1:])
    # Eq. 2 with ceil(T/M) would NOT give M complete cycles here: the bug the reference warns about
    eq2_restarts = np.flatnonzero(np.isclose(_eq2(alpha0, T, M), alpha0))
    assert len(eq2_restarts) != M or not np.allclose(_eq2(alpha0, T, M), ref, atol=ATOL)


def test_snapshot_cosine_past_the_end_and_errors():
    fn = schedules.snapshot_cosine(0.1, 20, 4)
    assert float(fn(20)) == 0.0 and float(fn(100)) == 0.0
    with pytest.raises(ValueError, match="total_steps"):
        schedules.snapshot_cosine(0.1, 3, 4)
    with pytest.raises(ValueError, match="num_cycles"):
        schedules.snapshot_cosine(0.1, 3, 0)


@pytest.mark.parametrize("T0,t_mult,eta_min,total", [(10, 1, 0.0, 35), (4, 2, 0.001, 60), (3, 3, 0.0, 40), (5, 1.5, 0.0, 50)])
def test_sgdr_closed_form(T0, t_mult, eta_min, total):
    eta_max = 0.1
    vals = _values(schedules.sgdr(eta_max, T0, total, t_mult=t_mult, eta_min=eta_min), total)
    # reference: walk the periods T_i = round(T0 * t_mult**i) in float64
    ref, period, boundaries = [], float(T0), []
    while len(ref) < total:
        Ti = max(1, int(round(period)))
        ref += [eta_min + (eta_max - eta_min) / 2 * (1 + np.cos(np.pi * c / Ti)) for c in range(Ti)]
        boundaries.append(len(ref))
        period *= t_mult
    np.testing.assert_allclose(vals, ref[:total], atol=ATOL)
    assert schedules.sgdr_boundaries(T0, total, t_mult) == tuple(b for b in boundaries if b <= total)
    if t_mult == 2 and T0 == 4:
        assert boundaries[:4] == [4, 12, 28, 60]  # 4, 8, 16, 32


def test_sgdr_t_mult_1_matches_snapshot_cosine():
    np.testing.assert_allclose(_values(schedules.sgdr(0.2, 10, 50), 50), _values(schedules.snapshot_cosine(0.2, 50, 5), 50), atol=ATOL)


@pytest.mark.parametrize("c,start", [(2, 0), (8, 0), (6, 5)])
def test_fge_triangle_closed_form(c, start):
    a1, a2, n = 0.05, 0.0005, 40
    vals = _values(schedules.fge_triangle(a1, a2, c, start), n)
    ref = []
    for count in range(n):
        if count < start:
            ref.append(a1)
            continue
        t = ((count - start) % c) / c
        ref.append(a1 * (1 - 2 * t) + a2 * 2 * t if t <= 0.5 else a1 * (2 * t - 1) + a2 * (2 - 2 * t))
    np.testing.assert_allclose(vals, ref, atol=ATOL)
    # snapshots: right after every step that used the minimum alpha2
    b = schedules.fge_boundaries(start, c, n)
    assert b and all(vals[s - 1] == pytest.approx(a2, abs=ATOL) for s in b)
    assert list(b) == [s + 1 for s in range(n) if np.isclose(ref[s], a2, atol=1e-9) and s >= start]
    with pytest.raises(ValueError, match="even"):
        schedules.fge_triangle(a1, a2, 5)


def test_fge_plan_joins_pretraining():
    from mergejax.ensembles.swa import fge_plan

    pre = schedules.step_decay(0.1, 40)
    lr_fn, b = fge_plan(pre, 30, 0.05, 0.001, 4, 46)
    vals = _values(lr_fn, 46)
    np.testing.assert_allclose(vals[:30], _values(pre, 30), atol=ATOL)
    np.testing.assert_allclose(vals[30:34], [0.05, 0.0255, 0.001, 0.0255], atol=ATOL)
    assert b == (33, 37, 41, 45)


def test_swa_schedule_closed_form():
    lr, swa_lr, start, n = 0.1, 0.02, 50, 80
    vals = _values(schedules.swa_schedule(lr, swa_lr, start), n)
    ref = []
    for c in range(n):
        t = c / start
        f = 1.0 if t <= 0.5 else (1 - (1 - swa_lr / lr) * (t - 0.5) / 0.4 if t <= 0.9 else swa_lr / lr)
        ref.append(lr * f)
    np.testing.assert_allclose(vals, ref, atol=ATOL)
    assert vals[25] == pytest.approx(0.1) and vals[45:].max() == pytest.approx(swa_lr, abs=1e-7)


def test_step_decay_is_the_single_model_baseline():
    vals = _values(schedules.step_decay(0.1, 200), 200)
    ref = np.where(np.arange(200) < 100, 0.1, np.where(np.arange(200) < 150, 0.01, 0.001))
    np.testing.assert_allclose(vals, ref, rtol=1e-6)
