"""Forward results equal jax.vmap(diffrax.diffeqsolve) with Tsit5: values, save times, steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedrk
from fusedrk import problems
from conftest import ENVELOPE_MULTIPLE, F64_TOL, assert_tree_close, diffrax_solve, float_tol
from fusedrk._measure import one_ulp_up, rel_err


def compare(field, y0, t0, t1, *, dtype, **kw):
    """Solve with fusedrk and with the oracle; assert equal values and per-lane step counts."""
    sol = fusedrk.solve(field, y0, t0, t1, **kw)
    oracle_kw = {k: v for k, v in kw.items() if k in ("args", "args_axes", "dt0", "rtol", "atol", "ts", "max_steps")}
    ref = diffrax_solve(field, y0, t0, t1, **oracle_kw)
    np.testing.assert_array_equal(sol.stats["num_accepted_steps"], ref.stats["num_accepted_steps"])
    np.testing.assert_array_equal(sol.stats["num_rejected_steps"], ref.stats["num_rejected_steps"])
    np.testing.assert_array_equal(sol.stats["num_steps"], ref.stats["num_steps"])
    np.testing.assert_array_equal(sol.result, 0)
    n = int(np.max(sol.stats["num_steps"]))
    assert_tree_close(sol.ys, ref.ys, rtol=float_tol(dtype, n))
    np.testing.assert_allclose(sol.ts, ref.ts[0], rtol=0, atol=0)
    for leaf, y in zip(jax.tree_util.tree_leaves(sol.ys), jax.tree_util.tree_leaves(y0)):
        assert leaf.dtype == y.dtype
    return sol, ref


@pytest.mark.parametrize("B", [1, 7])
def test_adaptive_per_lane_parameters_dict_state_with_ts(x64, B):
    p = problems.VDP
    y0, mu = p.make(B, jnp.float64)
    ts = jnp.linspace(p.t0, p.t1, 9)
    sol, ref = compare(p.field, y0, p.t0, p.t1, dtype=jnp.float64, args=mu, args_axes=0,
                       dt0=p.dt0, rtol=1e-8, atol=1e-8, ts=ts)
    assert sol.ys["x"].shape == (B, 9)
    # Lanes differ in stiffness: the per-lane step counts must too (when there are lanes).
    if B > 1:
        assert len(set(np.asarray(sol.stats["num_steps"]).tolist())) > 1
    assert int(np.sum(sol.stats["num_rejected_steps"])) > 0


def test_fixed_steps_shared_dict_args(x64):
    y0 = jnp.linspace(0.5, 1.5, 5)
    args = {"k": jnp.asarray(0.7), "c": jnp.asarray(0.3)}
    compare(problems.decay_field, y0, 0.0, 3.0, dtype=jnp.float64, args=args, dt0=0.07)


def test_fixed_steps_mixed_args_stacked_state(x64):
    p = problems.LOTKA_VOLTERRA
    y0, args = p.make(6, jnp.float64)
    compare(p.field, y0, p.t0, p.t1, dtype=jnp.float64, args=args, args_axes=p.args_axes, dt0=p.dt0,
            ts=jnp.linspace(0.0, 10.0, 4))


def test_adaptive_without_dt0_chooses_the_first_step_as_diffrax(x64):
    p = problems.LOTKA_VOLTERRA
    y0, args = p.make(5, jnp.float64)
    compare(p.field, y0, p.t0, p.t1, dtype=jnp.float64, args=args, args_axes=p.args_axes,
            rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("adaptive", [False, True])
def test_backward_in_time(x64, adaptive):
    y0, args = problems.DECAY.make(4, jnp.float64)
    tol = dict(rtol=1e-7, atol=1e-9) if adaptive else {}
    ts = jnp.asarray([3.0, 2.2, 1.0, 0.0])
    compare(problems.decay_field, y0, 3.0, 0.0, dtype=jnp.float64, args=args,
            args_axes=problems.DECAY.args_axes, dt0=-0.1, ts=ts, **tol)


def test_save_times_include_ends_and_repeats(x64):
    y0, args = problems.DECAY.make(3, jnp.float64)
    ts = jnp.asarray([0.0, 0.0, 0.45, 1.3, 1.3, 3.0, 3.0])
    sol, _ = compare(problems.decay_field, y0, 0.0, 3.0, dtype=jnp.float64, args=args,
                     args_axes=problems.DECAY.args_axes, rtol=1e-6, atol=1e-8, dt0=0.1, ts=ts)
    np.testing.assert_array_equal(sol.ys[:, 0], y0)  # theta = 0 returns y0 exactly
    np.testing.assert_array_equal(sol.ys[:, 3], sol.ys[:, 4])


def test_non_elementwise_field(x64):
    p = problems.LINEAR
    y0, args = p.make(5, jnp.float64)
    for tol in ({}, dict(rtol=1e-8, atol=1e-10)):
        compare(p.field, y0, p.t0, p.t1, dtype=jnp.float64, args=args, args_axes=p.args_axes,
                dt0=p.dt0, ts=jnp.linspace(0.0, 4.0, 5), **tol)


def test_zero_length_interval(x64):
    y0, args = problems.DECAY.make(3, jnp.float64)
    sol = fusedrk.solve(problems.decay_field, y0, 1.0, 1.0, args=args, args_axes=problems.DECAY.args_axes,
                        dt0=0.1, ts=jnp.asarray([1.0, 1.0]))
    np.testing.assert_array_equal(sol.ys, jnp.stack([y0, y0], axis=1))
    np.testing.assert_array_equal(sol.stats["num_steps"], 0)


def test_float32_fixed_steps_within_rounding():
    p = problems.LORENZ
    y0, rho = p.make(9, jnp.float32)
    compare(p.field, y0, p.t0, 0.5, dtype=jnp.float32, args=rho, args_axes=0, dt0=0.01)


def test_float32_adaptive_within_the_rounding_envelope():
    # Near error = 1 a rounding difference flips an accept/reject decision, and the lane then
    # takes other steps: diffrax itself moves by ~rtol when y0 moves by one ulp. The bar is a
    # small multiple of that move (plus the fixed-step rounding bound), measured here.
    p = problems.VDP
    y0, mu = p.make(64, jnp.float32)
    kw = dict(args=mu, args_axes=0, dt0=p.dt0, rtol=1e-4, atol=1e-4, ts=jnp.linspace(p.t0, p.t1, 7))
    sol = fusedrk.solve(p.field, y0, p.t0, p.t1, **kw)
    ref = diffrax_solve(p.field, y0, p.t0, p.t1, **kw)
    moved = diffrax_solve(p.field, one_ulp_up(y0), p.t0, p.t1, **kw)
    envelope = rel_err(moved.ys, ref.ys)
    assert envelope > 0  # the rounding model's premise: one ulp moves the reference
    n = int(np.max(ref.stats["num_steps"]))
    assert rel_err(sol.ys, ref.ys) <= ENVELOPE_MULTIPLE * envelope + float_tol(jnp.float32, n)
    flipped_by_one_ulp = np.mean(np.asarray(moved.stats["num_steps"]) != np.asarray(ref.stats["num_steps"]))
    differ = np.mean(np.asarray(sol.stats["num_steps"]) != np.asarray(ref.stats["num_steps"]))
    assert differ <= ENVELOPE_MULTIPLE * flipped_by_one_ulp + 2 / 64


def test_under_jit_with_traced_times(x64):
    y0, args = problems.DECAY.make(4, jnp.float64)

    @jax.jit
    def run(y0, args, t1, ts):
        return fusedrk.solve(problems.decay_field, y0, 0.0, t1, args=args, args_axes=problems.DECAY.args_axes,
                             dt0=0.1, rtol=1e-7, atol=1e-9, ts=ts)

    ts = jnp.asarray([0.5, 2.0])
    sol = run(y0, args, 2.0, ts)
    ref = diffrax_solve(problems.decay_field, y0, 0.0, 2.0, args=args, args_axes=problems.DECAY.args_axes,
                        dt0=0.1, rtol=1e-7, atol=1e-9, ts=ts)
    assert_tree_close(sol.ys, ref.ys, rtol=F64_TOL)
    np.testing.assert_array_equal(sol.stats["num_steps"], ref.stats["num_steps"])


def test_adaptive_backward_without_dt0(x64):
    # The first-step heuristic works on internal (increasing) time: a sign slip there sends
    # every lane to max_steps.
    y0, args = problems.DECAY.make(5, jnp.float64)
    sol, _ = compare(problems.decay_field, y0, 3.0, 0.0, dtype=jnp.float64, args=args,
                     args_axes=problems.DECAY.args_axes, rtol=1e-7, atol=1e-9, ts=jnp.asarray([3.0, 1.0, 0.0]))
    assert int(np.max(sol.stats["num_steps"])) < 100


def test_far_too_large_first_step_is_rejected_as_diffrax_does(x64):
    # dt0 = 0.5 on a stiff decay: the first attempts are rejected with the controller's
    # smallest factor (factormin), so the step count pins down that floor.
    y0 = jnp.linspace(0.5, 1.5, 3)
    args = {"k": jnp.asarray([50.0, 20.0, 5.0]), "c": jnp.asarray(0.3)}
    sol, _ = compare(problems.decay_field, y0, 0.0, 3.0, dtype=jnp.float64, args=args,
                     args_axes={"k": 0, "c": None}, dt0=0.5, rtol=1e-8, atol=1e-8)
    assert int(np.min(sol.stats["num_rejected_steps"])) >= 1


def test_fixed_steps_end_exactly_on_t1_from_an_inexact_interval(x64):
    # 1.1 + (6.3 - 1.1) is not 6.3 in floating point: the last step must still land on t1
    # itself, as diffrax's does, not a few ulps short of it (which would add a step).
    y0, args = problems.DECAY.make(3, jnp.float64)
    t0, t1 = 1.1, 6.3
    assert t0 + (t1 - t0) != t1
    sol, _ = compare(problems.decay_field, y0, t0, t1, dtype=jnp.float64, args=args,
                     args_axes=problems.DECAY.args_axes, dt0=0.26, ts=jnp.asarray([2.0, t1]))
    np.testing.assert_array_equal(sol.stats["num_steps"], 20)
