"""The Tsit5 tableau and interpolant: consistency and order, independent of diffrax."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from fusedrk import _step, _tableau


def test_order_conditions_up_to_five():
    # A few order conditions that a wrong or mistyped coefficient breaks.
    b, c = np.array(_tableau.B_SOL), np.array(_tableau.C)
    for q in range(1, 6):  # sum b_i c_i^(q-1) = 1/q, the quadrature conditions
        assert math.isclose(float(b @ c ** (q - 1)), 1 / q, abs_tol=1e-13), q


def test_embedded_method_is_order_four():
    b_hat = np.array(_tableau.B_SOL) - np.array(_tableau.B_ERROR)
    c = np.array(_tableau.C)
    for q in range(1, 5):
        assert math.isclose(float(b_hat @ c ** (q - 1)), 1 / q, abs_tol=1e-13), q


def _one_step(h):
    with jax.enable_x64(True):
        y0 = (jnp.ones((1,), jnp.float64),)
        field = lambda t, y: (y[0],)  # noqa: E731, y' = y
        t0, t1 = jnp.zeros((1,)), jnp.full((1,), h)
        y1, ks, _ = _step.tsit5_step(field, t0, t1, y0, field(t0, y0), t1 - t0)
        return float(y1[0][0]), ks, y0


def test_global_error_is_fifth_order():
    # y' = y cos t, y(0) = 1: y(2) = exp(sin 2). Halving dt divides the error by ~2^5.
    import fusedrk

    with jax.enable_x64(True):
        errors = []
        for dt in (0.1, 0.05):
            sol = fusedrk.solve(lambda t, y, a: y * jnp.cos(t), jnp.ones(1), 0.0, 2.0, dt0=dt)
            errors.append(abs(float(sol.ys[0, 0]) - math.exp(math.sin(2.0))))
    assert errors[1] < 1e-10
    assert 25 < errors[0] / errors[1] < 70


def test_interpolant_ends_on_the_step_and_tracks_exp():
    with jax.enable_x64(True):
        h = 0.1
        y1, ks, y0 = _one_step(h)
        for theta in (0.0, 0.3, 0.7, 1.0):
            y = _step.interpolate(jnp.full((1,), theta), y0, ks)[0][0]
            assert abs(float(y) - math.exp(theta * h)) < 1e-8, theta
        assert abs(float(_step.interpolate(jnp.ones((1,)), y0, ks)[0][0]) - y1) < 1e-14
