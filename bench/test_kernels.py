"""Kernel microbenchmarks (pytest-benchmark).

    python -m pytest bench/test_kernels.py --benchmark-enable --benchmark-only

The test run collects this file too, with benchmarks disabled (``--benchmark-disable`` in
pyproject.toml: each benchmarked call runs once), so its result checks run in CI.

Forward kernel without and with the tape, and the reverse kernel, at fixed sizes: the Lorenz
ensemble with 1,000 fixed steps (B = 65,536 on a GPU; B = 64 and 20 steps in interpret mode on
a CPU, where the numbers only show the harness works). Each benchmark first checks its result
against the jax backend.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedrk
from fusedrk import _reference, kernels, problems
from fusedrk._measure import rounding_tol

GPU = jax.default_backend() == "gpu"
B, T1 = (65536, 1.0) if GPU else (64, 0.02)
STEPS = int(round(T1 / problems.LORENZ.dt0))


@pytest.fixture(scope="module")
def setup():
    p = problems.LORENZ
    y0, rho = p.make(B, jnp.float32)

    def lane_fn(t, y, diff, nondiff):
        return tuple(jnp.broadcast_to(o, y[0].shape) for o in p.field(t, y, diff[0]))

    problem = kernels.TileProblem(lane_fn, (0,), ())
    config = _reference.Config(adaptive=False, save_ts=False, rows=STEPS + 1, tape_rows=STEPS + 1)
    times = _reference.Times(direction=jnp.asarray(1), t_start=jnp.asarray(0.0), t_end=jnp.asarray(T1),
                             dt0=jnp.asarray(p.dt0), ts=jnp.zeros((1,)), rtol=jnp.asarray(0.0),
                             atol=jnp.asarray(0.0))
    reference = fusedrk.solve(p.field, y0, 0.0, T1, args=rho, args_axes=0, dt0=p.dt0, backend="jax")
    return problem, config, times, y0, rho, reference


def _forward(setup, with_tape):
    problem, config, times, y0, rho, _ = setup
    return jax.jit(lambda y, r: kernels.forward(config, problem, times, y, [r], [], with_tape=with_tape,
                                                interpret=not GPU))


@pytest.mark.parametrize("with_tape", [False, True], ids=["no-tape", "tape"])
def test_forward_kernel(benchmark, setup, with_tape):
    fn = _forward(setup, with_tape)
    _, _, _, y0, rho, reference = setup
    out = jax.block_until_ready(fn(y0, rho))
    for ours, ref in zip(out.ys, reference.ys):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=rounding_tol(jnp.float32, STEPS) * float(np.max(np.abs(ref))))
    benchmark(lambda: jax.block_until_ready(fn(y0, rho)))


def test_reverse_kernel(benchmark, setup):
    problem, config, times, y0, rho, _ = setup
    fwd = jax.block_until_ready(_forward(setup, True)(y0, rho))
    ys_bar = tuple(jnp.ones_like(y) for y in fwd.ys)
    bwd = jax.jit(lambda f, g: kernels.backward(config, problem, times, y0, [rho], [], f, g, interpret=not GPU))
    _, rho_bar = jax.block_until_ready(bwd(fwd, ys_bar))
    expected = jax.grad(lambda r: sum(jnp.sum(v) for v in fusedrk.solve(
        problems.LORENZ.field, y0, 0.0, T1, args=r, args_axes=0, dt0=problems.LORENZ.dt0, backend="jax").ys))(rho)
    np.testing.assert_allclose(rho_bar[0], expected, rtol=0, atol=rounding_tol(jnp.float32, 2 * STEPS) * float(np.max(np.abs(expected))))
    benchmark(lambda: jax.block_until_ready(bwd(fwd, ys_bar)))
