"""Reverse-mode gradients equal diffrax's (RecursiveCheckpointAdjoint) and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedrk
from fusedrk import problems
from conftest import F64_TOL, assert_tree_close, diffrax_solve, float_tol


def _loss(ys):
    # Weighted so that every save and every lane carries a distinct cotangent.
    leaves = jax.tree_util.tree_leaves(ys)
    return sum(jnp.sum(jnp.sin(leaf) * (1.0 + jnp.arange(leaf.size).reshape(leaf.shape) / leaf.size)) for leaf in leaves)


def grads(field, y0, args, t0, t1, **kw):
    def ours(y0, args):
        return _loss(fusedrk.solve(field, y0, t0, t1, args=args, **kw).ys)

    def oracle(y0, args):
        return _loss(diffrax_solve(field, y0, t0, t1, args=args, **kw).ys)

    return jax.jit(jax.grad(ours, argnums=(0, 1)))(y0, args), jax.jit(jax.grad(oracle, argnums=(0, 1)))(y0, args)


@pytest.mark.parametrize("B", [1, 5])
def test_adaptive_per_lane_args_dict_state(x64, B):
    p = problems.VDP
    y0, mu = p.make(B, jnp.float64)
    ours, ref = grads(p.field, y0, mu, p.t0, p.t1, args_axes=0, dt0=p.dt0, rtol=1e-8, atol=1e-8,
                      ts=jnp.linspace(p.t0, p.t1, 7))
    assert_tree_close(ours, ref, rtol=F64_TOL)


def test_fixed_steps_per_lane_and_shared_args(x64):
    p = problems.LOTKA_VOLTERRA
    y0, args = p.make(6, jnp.float64)
    ours, ref = grads(p.field, y0, args, p.t0, p.t1, args_axes=p.args_axes, dt0=p.dt0)
    assert_tree_close(ours, ref, rtol=F64_TOL)
    assert ours[1]["b"].shape == ()  # a shared leaf gets one (summed) cotangent


@pytest.mark.parametrize("adaptive", [False, True])
def test_backward_in_time_with_saves(x64, adaptive):
    p = problems.DECAY
    y0, args = p.make(4, jnp.float64)
    tol = dict(rtol=1e-7, atol=1e-9) if adaptive else {}
    ours, ref = grads(p.field, y0, args, 3.0, 0.5, args_axes=p.args_axes, dt0=-0.1,
                      ts=jnp.asarray([3.0, 2.0, 2.0, 0.5]), **tol)
    assert_tree_close(ours, ref, rtol=F64_TOL)


def test_non_elementwise_field_and_shared_matrix(x64):
    p = problems.LINEAR
    y0, args = p.make(3, jnp.float64)
    ours, ref = grads(p.field, y0, args, p.t0, p.t1, args_axes=p.args_axes, rtol=1e-8, atol=1e-10,
                      ts=jnp.linspace(0.0, 4.0, 5))
    assert_tree_close(ours, ref, rtol=F64_TOL)
    assert ours[1]["A"].shape == (4, 4)


def test_float32_within_rounding():
    p = problems.LORENZ
    y0, rho = p.make(8, jnp.float32)
    ours, ref = grads(p.field, y0, rho, 0.0, 0.3, args_axes=0, dt0=0.01)
    assert_tree_close(ours, ref, rtol=float_tol(jnp.float32, 2 * 30))  # forward and reverse sweeps


def test_matches_finite_differences(x64):
    p = problems.DECAY
    y0, args = p.make(3, jnp.float64)
    ts = jnp.asarray([0.4, 1.7, 3.0])

    @jax.jit  # one compilation for the 13 evaluations below
    def loss(y0, k):
        sol = fusedrk.solve(p.field, y0, p.t0, p.t1, args={"k": k, "c": args["c"]}, args_axes=p.args_axes,
                            dt0=0.05, ts=np.asarray(ts))
        return _loss(sol.ys)

    g_y0, g_k = jax.jit(jax.grad(loss, argnums=(0, 1)))(y0, args["k"])
    eps = 1e-6
    for i in range(3):
        e = jnp.zeros(3).at[i].set(eps)
        fd_y0 = (loss(y0 + e, args["k"]) - loss(y0 - e, args["k"])) / (2 * eps)
        fd_k = (loss(y0, args["k"] + e) - loss(y0, args["k"] - e)) / (2 * eps)
        np.testing.assert_allclose(g_y0[i], fd_y0, rtol=1e-7)
        np.testing.assert_allclose(g_k[i], fd_k, rtol=1e-7)


def test_gradient_of_a_subset_of_the_outputs(x64):
    # Cotangents for a subset of saved outputs; the rest are symbolic zeros.
    p = problems.DECAY
    y0, args = p.make(2, jnp.float64)

    def loss(y0):
        sol = fusedrk.solve(p.field, y0, 0.0, 2.0, args=args, args_axes=p.args_axes, dt0=0.1,
                            ts=jnp.asarray([1.0, 2.0]))
        return jnp.sum(sol.ys[:, 1])

    def ref(y0):
        return jnp.sum(diffrax_solve(p.field, y0, 0.0, 2.0, args=args, args_axes=p.args_axes, dt0=0.1,
                                     ts=jnp.asarray([1.0, 2.0])).ys[:, 1])

    assert_tree_close(jax.grad(loss)(y0), jax.grad(ref)(y0), rtol=F64_TOL)


@pytest.mark.parametrize("name", ["t0", "t1", "ts", "dt0", "rtol"])
def test_differentiating_times_raises(x64, name):
    y0, args = problems.DECAY.make(2, jnp.float64)
    kw = dict(t0=0.0, t1=1.0, ts=jnp.asarray([0.5, 1.0]), dt0=0.1, **({"rtol": 1e-6, "atol": 1e-6} if name == "rtol" else {}))

    def loss(x):
        kw2 = dict(kw, **{name: x})
        t0, t1 = kw2.pop("t0"), kw2.pop("t1")
        return jnp.sum(fusedrk.solve(problems.decay_field, y0, t0, t1, args=args,
                                     args_axes=problems.DECAY.args_axes, **kw2).ys)

    with pytest.raises(ValueError, match=f"not differentiable with respect to {name}"):
        jax.grad(loss)(kw[name])


@pytest.mark.parametrize("backend", ["jax", "pallas"])
def test_zero_length_interval_gradient_counts_every_repeated_save(x64, backend):
    # t0 == t1: every output is y0 itself, so d sum(ys) / d y0 is the number of save times.
    y0, args = problems.DECAY.make(3, jnp.float64)

    def loss(y0):
        sol = fusedrk.solve(problems.decay_field, y0, 1.0, 1.0, args=args, args_axes=problems.DECAY.args_axes,
                            dt0=0.1, ts=np.asarray([1.0, 1.0]), backend=backend, interpret=backend == "pallas")
        return jnp.sum(sol.ys)

    np.testing.assert_array_equal(jax.grad(loss)(y0), 2.0)
    oracle = jax.grad(lambda y: jnp.sum(diffrax_solve(problems.decay_field, y, 1.0, 1.0, args=args,
                                                      args_axes=problems.DECAY.args_axes, dt0=0.1,
                                                      ts=np.asarray([1.0, 1.0])).ys))(y0)
    np.testing.assert_array_equal(oracle, 2.0)


@pytest.mark.parametrize("backend", ["jax", "pallas"])
def test_vmap_of_solve_equals_separate_solves(x64, backend):
    # README: solve works under jax.vmap (an extra batch axis over groups of lanes).
    p = problems.DECAY
    groups, B = 3, 4
    y0 = jnp.stack([jnp.linspace(0.5, 1.5, B) * (1 + 0.1 * g) for g in range(groups)])
    k = jnp.stack([jnp.linspace(0.2, 2.0, B) + g for g in range(groups)])
    c = jnp.asarray(0.3)
    ts = np.asarray([0.5, 2.0])
    weights = 1.0 + jnp.arange(groups * B * 2).reshape(groups, B, 2) / 7.0

    def run(y0, k, c):
        sol = fusedrk.solve(p.field, y0, 0.0, 2.0, args={"k": k, "c": c}, args_axes={"k": 0, "c": None}, dt0=0.1,
                            rtol=1e-8, atol=1e-8, ts=ts, backend=backend, interpret=backend == "pallas")
        return sol.ys, sol.stats["num_steps"]

    ys, steps = jax.vmap(run, in_axes=(0, 0, None))(y0, k, c)
    separate = [run(y0[g], k[g], c) for g in range(groups)]
    assert_tree_close(ys, jnp.stack([s[0] for s in separate]), rtol=F64_TOL)
    np.testing.assert_array_equal(steps, jnp.stack([s[1] for s in separate]))

    def batched_loss(y0, k, c):
        return jnp.sum(jnp.sin(jax.vmap(run, in_axes=(0, 0, None))(y0, k, c)[0]) * weights)

    def separate_loss(y0, k, c):
        return sum(jnp.sum(jnp.sin(run(y0[g], k[g], c)[0]) * weights[g]) for g in range(groups))

    assert_tree_close(jax.grad(batched_loss, argnums=(0, 1, 2))(y0, k, c),
                      jax.grad(separate_loss, argnums=(0, 1, 2))(y0, k, c), rtol=F64_TOL)


@pytest.mark.parametrize("backend", ["jax", "pallas"])
def test_jit_with_traced_times_equals_concrete_times(x64, backend):
    p = problems.DECAY
    y0, args = p.make(3, jnp.float64)
    kw = dict(args_axes=p.args_axes, rtol=1e-7, atol=1e-9, backend=backend, interpret=backend == "pallas")

    def loss(y0, args, t1, dt0, ts):
        return _loss(fusedrk.solve(p.field, y0, 0.0, t1, args=args, dt0=dt0, ts=ts, **kw).ys)

    ts = np.asarray([0.5, 2.0])
    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(y0, args, 2.0, 0.1, ts)
    concrete = jax.value_and_grad(lambda y, a: loss(y, a, 2.0, 0.1, ts), argnums=(0, 1))(y0, args)
    assert_tree_close(traced, concrete, rtol=F64_TOL)
    _, ref = grads(p.field, y0, args, 0.0, 2.0, args_axes=p.args_axes, dt0=0.1, rtol=1e-7, atol=1e-9, ts=ts)
    assert_tree_close(traced[1], ref, rtol=F64_TOL)
