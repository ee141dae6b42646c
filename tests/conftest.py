"""Shared fixtures and the diffrax oracle: ``jax.vmap(diffrax.diffeqsolve)`` with Tsit5."""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedrk._measure import ENVELOPE_MULTIPLE, rounding_tol  # noqa: F401 (tests import them from here)


@pytest.fixture
def x64():
    """Run a test in float64 (x64 is enabled only inside it, never globally)."""
    with jax.enable_x64(True):
        yield


def diffrax_solve(field, y0, t0, t1, *, args=None, args_axes=None, dt0=None, rtol=None, atol=None,
                  ts=None, max_steps=4096, adjoint=None, throw=True):
    """The oracle: the same settings expressed in diffrax, vmapped over lanes."""
    controller = diffrax.ConstantStepSize() if rtol is None else diffrax.PIDController(rtol=rtol, atol=atol)
    saveat = diffrax.SaveAt(t1=True) if ts is None else diffrax.SaveAt(ts=ts)
    adjoint = diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint

    def one(y0_lane, args_lane):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(field), diffrax.Tsit5(), t0, t1, dt0, y0_lane, args_lane,
            saveat=saveat, stepsize_controller=controller, max_steps=max_steps,
            adjoint=adjoint, throw=throw,
        )

    return jax.vmap(one, in_axes=(0, args_axes))(y0, args)


# float64 against diffrax: measured errors are ~3e-15 (values) and ~2e-14 (gradients), so a bar
# of 1e-12 leaves room for longer solves while still catching a bug of size 1e-11.
F64_TOL = 1e-12


def float_tol(dtype, num_steps: int) -> float:
    """Relative tolerance between two Tsit5 implementations that differ only in rounding.

    Each step adds a few ulps of relative error (the b-weighted sum of seven stages, each
    rounded); over n steps errors add at worst linearly. 10 ulps per step bounds it with room
    for stage-order differences. float64 solves are held to at least F64_TOL. A gradient sweeps
    the steps twice (forward and reverse): pass twice the step count.
    """
    bound = rounding_tol(dtype, num_steps)
    return max(bound, F64_TOL) if dtype == jnp.float64 else bound


def assert_tree_close(actual, expected, rtol, atol=None):
    """Leafwise comparison, scaled by the largest magnitude of each expected leaf."""
    a_leaves, a_def = jax.tree_util.tree_flatten(actual)
    e_leaves, e_def = jax.tree_util.tree_flatten(expected)
    assert a_def == e_def, (a_def, e_def)
    for a, e in zip(a_leaves, e_leaves):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, (a.shape, e.shape)
        scale = max(float(np.max(np.abs(e[np.isfinite(e)]), initial=0.0)), 1e-300)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=(rtol * scale if atol is None else atol))


class CountedField:
    """A vector field -k y + sin t that counts its evaluations with a host callback."""

    def __init__(self):
        self.calls = 0

    def _bump(self):
        self.calls += 1

    def __call__(self, t, y, args):
        jax.debug.callback(self._bump)
        return -args * y + jnp.sin(t)

    def count(self, fn, *args) -> int:
        """Evaluations made by one run of ``fn(*args)``."""
        self.calls = 0
        jax.block_until_ready(fn(*args))
        return self.calls
