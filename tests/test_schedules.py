"""Tests for nbjax.pruning.schedules: hand-computed values, Python and jit paths agree."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbjax.pruning import schedules as sch

POLY = dict(initial=0.1, final=0.9, start_step=100, end_step=300, exponent=3.0)


def test_polynomial_sparsity_by_hand():
    cases = {
        0: 0.1,  # before t0: initial
        99: 0.1,
        100: 0.1,  # at t0: 0.9 + (0.1 - 0.9) * 1**3
        150: 0.9 - 0.8 * 0.75**3,  # (t - t0)/(t1 - t0) = 0.25 -> 0.5625
        200: 0.9 - 0.8 * 0.5**3,  # middle -> 0.8
        300: 0.9,  # at t1: final
        1000: 0.9,  # after t1
    }
    for step, expected in cases.items():
        assert sch.polynomial_sparsity(step, **POLY) == pytest.approx(expected, abs=1e-12)
    assert sch.polynomial_sparsity(150, **POLY) == pytest.approx(0.5625)
    assert sch.polynomial_sparsity(200, **POLY) == pytest.approx(0.8)
    # exponent 1 is linear
    assert sch.polynomial_sparsity(200, **{**POLY, "exponent": 1.0}) == pytest.approx(0.5)


def test_polynomial_sparsity_jit_matches_python():
    f = jax.jit(lambda t: sch.polynomial_sparsity(t, **POLY))
    steps = [0, 99, 100, 150, 200, 250, 300, 1000]
    got = [float(f(jnp.int32(t))) for t in steps]
    want = [sch.polynomial_sparsity(t, **POLY) for t in steps]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_polynomial_sparsity_validation():
    with pytest.raises(ValueError, match="final"):
        sch.polynomial_sparsity(0, **{**POLY, "final": 1.0})
    with pytest.raises(ValueError, match="initial"):
        sch.polynomial_sparsity(0, **{**POLY, "initial": -0.1})
    with pytest.raises(ValueError, match="end_step"):
        sch.polynomial_sparsity(0, **{**POLY, "end_step": 100})
    with pytest.raises(ValueError, match="exponent"):
        sch.polynomial_sparsity(0, **{**POLY, "exponent": 0.0})


def test_is_update_step_hand_list():
    kw = dict(start_step=10, end_step=35, every=10)
    expected = [10, 20, 30, 35]  # the grid, plus t1 itself (35 is off the grid)
    got = [t for t in range(60) if sch.is_update_step(t, **kw)]
    assert got == expected
    f = jax.jit(lambda t: sch.is_update_step(t, **kw))
    assert [t for t in range(60) if bool(f(jnp.int32(t)))] == expected
    assert [t for t in range(50) if sch.is_update_step(t, start_step=0, end_step=40, every=20)] == [
        0,
        20,
        40,
    ]


def test_is_update_step_past_t1_keeps_the_grid_and_t1():
    """pdwp re-ranks past t1 (``last_step``) on the grid from t0, and at t1 off the grid."""
    kw = dict(start_step=10, end_step=35, every=10, last_step=62)
    expected = [10, 20, 30, 35, 40, 50, 60]
    assert [t for t in range(80) if sch.is_update_step(t, **kw)] == expected
    f = jax.jit(lambda t: sch.is_update_step(t, **kw))
    assert [t for t in range(80) if bool(f(jnp.int32(t)))] == expected


def test_is_update_step_validation():
    with pytest.raises(ValueError, match="every"):
        sch.is_update_step(0, start_step=0, end_step=10, every=0)
    with pytest.raises(ValueError, match="end_step"):
        sch.is_update_step(0, start_step=10, end_step=5, every=1)
    with pytest.raises(ValueError, match="last_step"):
        sch.is_update_step(0, start_step=0, end_step=10, every=2, last_step=9)


def test_cosine_drop_fraction_by_hand():
    kw = dict(initial=0.3, end_step=100)
    cases = {
        0: 0.3,
        25: 0.3 * 0.5 * (1 + math.cos(math.pi / 4)),
        50: 0.15,
        75: 0.3 * 0.5 * (1 - math.cos(math.pi / 4)),
        100: 0.0,
        500: 0.0,
    }
    f = jax.jit(lambda t: sch.cosine_drop_fraction(t, **kw))
    for step, expected in cases.items():
        assert sch.cosine_drop_fraction(step, **kw) == pytest.approx(expected, abs=1e-12)
        assert float(f(jnp.int32(step))) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError):
        sch.cosine_drop_fraction(0, initial=0.3, end_step=0)
    with pytest.raises(ValueError):
        sch.cosine_drop_fraction(0, initial=1.5, end_step=10)


def test_validate_sparsity():
    assert sch.validate_sparsity(0.0) == 0.0
    for bad in (1.0, -0.01, float("nan"), "x"):
        with pytest.raises(ValueError):
            sch.validate_sparsity(bad)
    assert sch.validate_sparsity(1.0, allow_one=True) == 1.0
