"""Failed lanes under every way of calling solve: the error is raised where the user can see
it (also under jit(grad), whose forward outputs XLA would otherwise prune with their check),
names the failing call, and with throw=False each lane's stop time is reported."""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedrk
from fusedrk import problems

from conftest import F64_TOL, diffrax_solve

P = problems.DECAY
STIFF = jnp.asarray([0.1, 50.0, 80.0])  # lane 0 is easy; the others need far more than 20 steps


def _inputs(dtype=jnp.float32):
    y0, args = P.make(3, dtype)
    return y0, dict(args, k=STIFF.astype(dtype))


def _solve(y0, args, t0=0.0, t1=3.0, **kw):
    kw = {**dict(dt0=0.1 if t1 > t0 else -0.1, rtol=1e-8, atol=1e-8, max_steps=20), **kw}
    return fusedrk.solve(P.field, y0, t0, t1, args=args, args_axes=P.args_axes, **kw)


@pytest.mark.parametrize("wrt", ["y0", "args"])
@pytest.mark.parametrize("transform", ["grad", "jit(grad)", "jit(value_and_grad)"])
def test_a_failed_lane_raises_under_gradients(transform, wrt):
    y0, args = _inputs()

    def loss(y0, args):
        return jnp.sum(_solve(y0, args).ys)

    argnums = 0 if wrt == "y0" else 1  # with args only, y0's cotangent is unused and pruned
    fn = {"grad": jax.grad(loss, argnums), "jit(grad)": jax.jit(jax.grad(loss, argnums)),
          "jit(value_and_grad)": jax.jit(jax.value_and_grad(loss, argnums))}[transform]
    # Under jax.jit, equinox's error reaches Python as a JaxRuntimeError carrying the message.
    with pytest.raises((eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError), match="maximum number of solver steps"):
        jax.block_until_ready(fn(y0, args))
    # The same gradient without the failing lanes is silent.
    assert np.isfinite(np.asarray(jax.jit(jax.grad(lambda y: jnp.sum(_solve(y, args, max_steps=4096).ys)))(y0))).all()


def test_the_error_names_the_failing_call_not_an_earlier_one():
    y0, args = _inputs()
    _solve(y0, args, max_steps=4096)  # succeeds, with the same shapes as the failing call below
    line = sys._getframe().f_lineno + 2
    with pytest.raises(eqx.EquinoxRuntimeError) as info:
        jax.block_until_ready(_solve(y0, args).ys)
    ours = [(e.lineno, e.name) for e in info.traceback if e.path == __file__ or str(e.path) == __file__]
    assert (line - 1, "test_the_error_names_the_failing_call_not_an_earlier_one") in ours, ours
    # Nothing in the error's text points at the successful call's line.
    assert f"line {line - 3}" not in str(info.value)


@pytest.mark.parametrize("backwards", [False, True])
def test_each_lane_reports_the_time_it_reached(x64, backwards):
    y0, args = _inputs(jnp.float64)
    t0, t1 = (3.0, 0.0) if backwards else (0.0, 3.0)
    # At rtol = 1e-8 the error estimate is a sum of stage increments cancelling to ~1e-9 of
    # them, so its last bits depend on the summation order, and diffrax's order differs:
    # step ends moved by 2.5e-10 (relative) after three steps there, 6e-14 at 1e-4.
    kw = dict(dt0=0.1 if t1 > t0 else -0.1, rtol=1e-4, atol=1e-4, max_steps=8, throw=False)
    sol = _solve(y0, args, t0, t1, **kw)
    expected = diffrax_solve(P.field, y0, t0, t1, args=args, args_axes=P.args_axes, **kw)
    np.testing.assert_array_equal(sol.result, [0, 1, 1])
    assert float(sol.t_final[0]) == t1
    # Where a lane stopped: the end of its last accepted step, as diffrax's SaveAt(t1=True) has it.
    np.testing.assert_allclose(sol.t_final, expected.ts[:, -1], rtol=F64_TOL, atol=0)
    assert all(min(t0, t1) < float(t) < max(t0, t1) for t in sol.t_final[1:])


def test_the_kernels_report_the_time_each_lane_reached(x64):
    y0, args = _inputs(jnp.float64)
    kw = dict(throw=False, ts=jnp.asarray([0.5, 3.0]), rtol=1e-4, atol=1e-4, max_steps=8)  # see above
    sol = _solve(y0, args, backend="jax", **kw)
    tiles = _solve(y0, args, backend="pallas", interpret=True, **kw)
    np.testing.assert_array_equal(tiles.result, [0, 1, 1])
    np.testing.assert_array_equal(tiles.result, sol.result)
    np.testing.assert_allclose(tiles.t_final, sol.t_final, rtol=F64_TOL, atol=0)


@pytest.mark.parametrize("backend", ["jax", "pallas"])
def test_a_lane_that_blows_up_with_fixed_steps_reports_where_it_stopped(x64, backend):
    # dy/dt = k y^2 from y = 1 blows up at t = 1/k: the k = 5 lane goes non-finite near 0.2
    # while the shared fixed-step times of the other lane run on to t1.
    def field(t, y, k):
        return k * y ** 2

    sol = fusedrk.solve(field, jnp.ones(2), 0.0, 1.0, args=jnp.asarray([0.1, 5.0]), args_axes=0, dt0=0.01,
                        throw=False, backend=backend, interpret=backend == "pallas")
    np.testing.assert_array_equal(sol.result, [fusedrk.RESULTS.successful, fusedrk.RESULTS.nonfinite])
    assert float(sol.t_final[0]) == 1.0
    assert 0.1 < float(sol.t_final[1]) < 0.3, sol.t_final
