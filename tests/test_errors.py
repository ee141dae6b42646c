"""Bad input raises a clear error before any device work; failing lanes are reported."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedrk
from fusedrk import problems


def f(t, y, args):
    return -y


Y0 = jnp.ones(4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(y0={"a": jnp.ones(3), "b": jnp.ones(4)}, dt0=0.1), ValueError, "same leading batch axis"),
        (dict(y0=jnp.ones(4, jnp.int32), dt0=0.1), TypeError, "floating-point dtype"),
        (dict(y0=jnp.asarray(1.0), dt0=0.1), ValueError, "leading batch axis"),
        (dict(), ValueError, "fixed steps .* need dt0"),
        (dict(dt0=-0.1), ValueError, "dt0 must have the sign of t1 - t0"),
        (dict(dt0=0.0), ValueError, "dt0 must be non-zero"),
        (dict(dt0=0.1, ts=jnp.asarray([0.5, 0.2])), ValueError, "ts must be sorted"),
        (dict(dt0=0.1, ts=jnp.asarray([0.5, 1.5])), ValueError, "ts must lie between t0 and t1"),
        (dict(dt0=0.1, ts=jnp.ones((2, 2))), ValueError, "1-D"),
        (dict(dt0=0.1, rtol=1e-6), ValueError, "rtol and atol must be given together"),
        (dict(dt0=0.1, max_steps=0), ValueError, "max_steps must be a positive int"),
        (dict(dt0=0.1, backend="cuda"), ValueError, "backend must be one of"),
        (dict(dt0=0.1, backend="pallas"), ValueError, "interpret=True"),
        (dict(dt0=0.1, args=jnp.ones(3), args_axes=0), ValueError, "needs a leading axis of 4 lanes"),
        (dict(dt0=0.1, args={"a": 1.0}, args_axes={"b": 0}), ValueError, "args_axes must be a prefix"),
        (dict(dt0=0.1, args=2.0, args_axes=0), ValueError, "not an array"),
    ],
)
def test_bad_input(kwargs, error, match):
    kwargs = dict(kwargs)
    y0 = kwargs.pop("y0", Y0)
    with pytest.raises(error, match=match):
        fusedrk.solve(f, y0, 0.0, 1.0, **kwargs)


def test_field_with_wrong_output_structure():
    with pytest.raises(ValueError, match="structure of one lane of y0"):
        fusedrk.solve(lambda t, y, a: (y, y), Y0, 0.0, 1.0, dt0=0.1)
    with pytest.raises(ValueError, match="shape"):
        fusedrk.solve(lambda t, y, a: jnp.stack([y, y]), Y0, 0.0, 1.0, dt0=0.1)


def test_traced_bad_times_raise_at_run_time():
    run = jax.jit(lambda dt0: fusedrk.solve(f, Y0, 0.0, 1.0, dt0=dt0).ys)
    with pytest.raises(Exception, match="dt0 must have the sign"):
        jax.block_until_ready(run(-0.1))
    run_ts = jax.jit(lambda ts: fusedrk.solve(f, Y0, 0.0, 1.0, dt0=0.1, ts=ts).ys)
    with pytest.raises(Exception, match="ts must be sorted"):
        jax.block_until_ready(run_ts(jnp.asarray([0.6, 0.3])))


def test_tape_larger_than_memory_is_refused_before_running():
    y0 = jnp.ones((2**20,))
    loss = lambda y0: jnp.sum(fusedrk.solve(f, y0, 0.0, 1.0, dt0=1e-6, rtol=1e-3, atol=1e-3,  # noqa: E731
                                            max_steps=2**20).ys)
    with pytest.raises(MemoryError, match="tape needs .* GiB"):
        jax.jit(jax.grad(loss)).lower(y0)


def test_fixed_steps_with_concrete_times_size_the_tape_exactly(x64, monkeypatch):
    # 2.1 / 0.3 is 7.000000000000001 in floating point, yet diffrax takes 7 steps: the tape
    # holds those 7 rows plus one spare, read here from the message of a refused allocation.
    monkeypatch.setattr(fusedrk._solve, "_device_memory_bytes", lambda: 1)
    loss = lambda y0: jnp.sum(fusedrk.solve(f, y0, 0.0, 2.1, dt0=0.3).ys)  # noqa: E731
    with pytest.raises(MemoryError, match=r"\(8 rows x 4 lanes:"):
        jax.grad(loss)(jnp.ones(4, jnp.float64))


def _stiff_lanes(B=3):
    # Lane 0 is easy, the others need many steps.
    return jnp.asarray([0.1, 50.0, 80.0][:B])


def test_max_steps_raises_with_throw():
    p = problems.DECAY
    y0, args = p.make(3, jnp.float32)
    args = dict(args, k=_stiff_lanes())
    with pytest.raises(eqx.EquinoxRuntimeError, match="maximum number of solver steps"):
        jax.block_until_ready(fusedrk.solve(p.field, y0, 0.0, 3.0, args=args, args_axes=p.args_axes,
                                            dt0=0.1, rtol=1e-8, atol=1e-8, max_steps=20).ys)


def test_max_steps_reported_without_throw():
    p = problems.DECAY
    y0, args = p.make(3, jnp.float32)
    args = dict(args, k=_stiff_lanes())
    sol = fusedrk.solve(p.field, y0, 0.0, 3.0, args=args, args_axes=p.args_axes, dt0=0.1,
                        rtol=1e-5, atol=1e-5, max_steps=20, throw=False, ts=jnp.asarray([0.05, 3.0]))
    np.testing.assert_array_equal(sol.result, [fusedrk.RESULTS.successful, fusedrk.RESULTS.max_steps_reached,
                                               fusedrk.RESULTS.max_steps_reached])
    assert int(sol.stats["num_steps"][1]) == 20
    assert np.isinf(np.asarray(sol.ys[1, 1]))  # never reached: left as diffrax leaves it
    assert np.isfinite(np.asarray(sol.ys[0])).all()


@pytest.mark.parametrize("adaptive", [False, True])
def test_nan_field_stops_instead_of_hanging(adaptive):
    def nan_after_half(t, y, args):
        return jnp.where(t > 0.5, jnp.nan, -y)

    tol = dict(rtol=1e-4, atol=1e-4) if adaptive else {}
    sol = fusedrk.solve(nan_after_half, Y0, 0.0, 1.0, dt0=0.1, throw=False, max_steps=200, **tol)
    expected = fusedrk.RESULTS.max_steps_reached if adaptive else fusedrk.RESULTS.nonfinite
    np.testing.assert_array_equal(sol.result, expected)
    if not adaptive:  # the lane stopped at the first non-finite state, not after max_steps
        assert int(sol.stats["num_steps"][0]) < 10
    with pytest.raises(eqx.EquinoxRuntimeError):
        jax.block_until_ready(fusedrk.solve(nan_after_half, Y0, 0.0, 1.0, dt0=0.1, max_steps=200, **tol).ys)


def test_ts_as_a_list_works_like_an_array():
    # diffrax takes array-likes; so does solve.
    from_list = fusedrk.solve(f, Y0, 0.0, 1.0, dt0=0.1, ts=[0.0, 0.5, 1.0])
    from_array = fusedrk.solve(f, Y0, 0.0, 1.0, dt0=0.1, ts=jnp.asarray([0.0, 0.5, 1.0]))
    np.testing.assert_array_equal(from_list.ys, from_array.ys)
    np.testing.assert_array_equal(from_list.ts, from_array.ts)


def test_backward_solve_with_increasing_ts_is_told_decreasing():
    with pytest.raises(ValueError, match=r"ts must be sorted .*: decreasing, as t1 < t0"):
        fusedrk.solve(f, Y0, 1.0, 0.0, dt0=-0.1, ts=[0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match=r"ts must be sorted .*: increasing, as t1 > t0"):
        fusedrk.solve(f, Y0, 0.0, 1.0, dt0=0.1, ts=[1.0, 0.5, 0.0])
    run_ts = jax.jit(lambda ts: fusedrk.solve(f, Y0, 1.0, 0.0, dt0=-0.1, ts=ts).ys)
    with pytest.raises(Exception, match=r"decreasing, as t1 < t0"):
        jax.block_until_ready(run_ts(jnp.asarray([0.3, 0.6])))


def decay(t, y, args):
    return -args["k"] * y


@pytest.mark.parametrize("y0", [Y0, jnp.ones((4, 3))], ids=["shape-error", "broadcast-error"])
def test_per_lane_args_without_args_axes_hint_at_args_axes(y0):
    # A [B] argument left shared: the field sees all B values in one lane, and the shape error
    # that follows (from our check or from JAX inside the field) names the argument and args_axes.
    with pytest.raises((ValueError, TypeError), match=r"args\['k'\] has a leading axis of 4 lanes .* args_axes=0"):
        fusedrk.solve(decay, y0, 0.0, 1.0, dt0=0.1, args={"k": jnp.linspace(0.5, 1.0, 4), "c": 1.0})


def _loss(y0):
    return jnp.sum(fusedrk.solve(lambda t, y, a: -y * y, y0, 0.0, 1.0, dt0=0.1).ys)


@pytest.mark.parametrize("transform", [
    lambda: jax.jvp(_loss, (Y0,), (Y0,)),
    lambda: jax.jacfwd(_loss)(Y0),
    lambda: jax.jit(lambda y: jax.jvp(_loss, (y,), (y,)))(Y0),  # JAX alone would refuse only at compile time
], ids=["jvp", "jacfwd", "jit-jvp"])
def test_forward_mode_says_what_is_supported(transform):
    with pytest.raises(TypeError, match=r"supports reverse-mode derivatives of first order .* Forward mode"):
        transform()


@pytest.mark.parametrize("transform", [
    lambda: jax.grad(lambda y: jnp.sum(jax.grad(_loss)(y)))(Y0),
    lambda: jax.jit(jax.jacrev(jax.grad(_loss)))(Y0),
], ids=["grad-grad", "jit-jacrev-grad"])
def test_second_reverse_pass_says_what_is_supported(transform):
    with pytest.raises(ValueError, match=r"supports reverse-mode derivatives of first order .* cannot be "
                                         r"differentiated again in reverse mode"):
        transform()


def test_forward_over_reverse_equals_diffrax_with_fixed_steps(x64):
    # What the refusals above recommend for second derivatives.
    import diffrax
    from conftest import diffrax_solve

    p = problems.VDP
    y0, mu = p.make(3, jnp.float64)

    def ours(mu):
        return jnp.sum(fusedrk.solve(p.field, y0, 0.0, 2.0, args=mu, args_axes=0, dt0=0.01, backend="jax").ys["x"] ** 2)

    def theirs(mu):
        sol = diffrax_solve(p.field, y0, 0.0, 2.0, args=mu, args_axes=0, dt0=0.01, adjoint=diffrax.ForwardMode())
        return jnp.sum(sol.ys["x"] ** 2)

    expected = jax.jacfwd(jax.jacfwd(theirs))(mu)
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(jax.hessian(ours)(mu), expected, rtol=1e-12, atol=1e-12 * scale)
