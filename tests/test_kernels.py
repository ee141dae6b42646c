"""The Pallas kernels compute what the jax backend computes, and lower to Triton.

The same assertions run in interpret mode on every machine (class TestInterpret) and compiled
on a GPU (class TestCompiled, marker ``gpu``, skipped without one). Sizes are small: interpret
mode runs the kernel body as ordinary JAX ops, one tile after another.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedrk
from fusedrk import _reference, kernels, problems
from conftest import assert_tree_close, diffrax_solve

HAS_GPU = jax.default_backend() == "gpu"


def _loss(ys):
    leaves = jax.tree_util.tree_leaves(ys)
    return sum(jnp.sum(jnp.sin(x) * (1.0 + jnp.arange(x.size).reshape(x.shape) / x.size)) for x in leaves)


CASES = {
    # name: (problem, B, t0, t1, solve keywords)
    "fixed-ts-mixed-args": (problems.LOTKA_VOLTERRA, 7, 0.0, 2.0, dict(dt0=0.1, ts=jnp.asarray([0.0, 0.7, 0.7, 2.0]))),
    "adaptive-dict-state": (problems.VDP, 7, 0.0, 3.0, dict(dt0=0.01, rtol=1e-6, atol=1e-6, ts=jnp.linspace(0.0, 3.0, 5))),
    "adaptive-t1-only-one-lane": (problems.DECAY, 1, 0.0, 3.0, dict(dt0=0.1, rtol=1e-7, atol=1e-9)),
    "fixed-two-tiles": (problems.DECAY, 129, 0.0, 1.0, dict(dt0=0.1, ts=jnp.asarray([0.5, 1.0]))),
    "backward-adaptive": (problems.DECAY, 5, 2.0, 0.0, dict(dt0=-0.1, rtol=1e-7, atol=1e-9, ts=jnp.asarray([2.0, 1.1, 0.0]))),
    "adaptive-no-dt0": (problems.LORENZ, 3, 0.0, 0.3, dict(rtol=1e-6, atol=1e-6)),
}


def _lotka_scalar_field(t, y, args):
    prey, predator = y
    return (args["a"] * prey - args["b"] * prey * predator, args["d"] * prey * predator - args["g"] * predator)


def _setup(case, dtype):
    problem, B, t0, t1, kw = CASES[case]
    y0, args = problem.make(B, dtype)
    field = problem.field
    if problem is problems.LOTKA_VOLTERRA:  # the kernels take scalar leaves: split the [B, 2] state
        y0, field = (y0[:, 0], y0[:, 1]), _lotka_scalar_field
    return field, y0, args, problem.args_axes, t0, t1, kw


class _Agreement:
    interpret: bool

    def solve(self, field, y0, t0, t1, **kw):
        return fusedrk.solve(field, y0, t0, t1, backend="pallas", interpret=self.interpret, **kw)

    @pytest.mark.parametrize("case", sorted(CASES))
    def test_forward_and_gradient_equal_the_jax_backend(self, x64, case):
        field, y0, args, axes, t0, t1, kw = _setup(case, jnp.float64)
        ours = self.solve(field, y0, t0, t1, args=args, args_axes=axes, **kw)
        ref = fusedrk.solve(field, y0, t0, t1, args=args, args_axes=axes, backend="jax", **kw)
        for key in ref.stats:
            np.testing.assert_array_equal(ours.stats[key], ref.stats[key])
        np.testing.assert_array_equal(ours.result, ref.result)
        assert_tree_close(ours.ys, ref.ys, rtol=1e-12)

        def loss(solve_fn, y0, args):
            return _loss(solve_fn(field, y0, t0, t1, args=args, args_axes=axes, **kw).ys)

        g_ours = jax.grad(functools.partial(loss, self.solve), argnums=(0, 1))(y0, args)
        g_ref = jax.grad(functools.partial(loss, functools.partial(fusedrk.solve, backend="jax")),
                         argnums=(0, 1))(y0, args)
        assert_tree_close(g_ours, g_ref, rtol=1e-12)

    def test_float32_matches_diffrax(self):
        p = problems.LORENZ
        y0, rho = p.make(9, jnp.float32)
        kw = dict(dt0=0.01, ts=jnp.asarray([0.1, 0.2]))
        ours = self.solve(p.field, y0, 0.0, 0.2, args=rho, args_axes=0, **kw)
        ref = diffrax_solve(p.field, y0, 0.0, 0.2, args=rho, args_axes=0, **kw)
        np.testing.assert_array_equal(ours.stats["num_steps"], ref.stats["num_steps"])
        assert_tree_close(ours.ys, ref.ys, rtol=10 * float(jnp.finfo(jnp.float32).eps) * 20)

    def test_lane_hitting_max_steps(self):
        p = problems.DECAY
        y0, args = p.make(3, jnp.float32)
        args = dict(args, k=jnp.asarray([0.1, 50.0, 80.0]))
        kw = dict(args=args, args_axes=p.args_axes, dt0=0.1, rtol=1e-5, atol=1e-5, max_steps=20,
                  throw=False, ts=jnp.asarray([0.05, 3.0]))
        ours = self.solve(p.field, y0, 0.0, 3.0, **kw)
        ref = fusedrk.solve(p.field, y0, 0.0, 3.0, backend="jax", **kw)
        np.testing.assert_array_equal(ours.result, [0, 1, 1])
        np.testing.assert_array_equal(ours.stats["num_steps"], ref.stats["num_steps"])
        np.testing.assert_array_equal(ours.ys, ref.ys)  # including inf where never saved


class TestInterpret(_Agreement):
    interpret = True


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
class TestCompiled(_Agreement):
    interpret = False


def test_unsupported_fields_name_the_jax_backend():
    p = problems.LINEAR
    y0, args = p.make(3, jnp.float32)
    with pytest.raises(ValueError, match=r'per-lane shape \(4,\).*backend="jax"'):
        fusedrk.solve(p.field, y0, p.t0, p.t1, args=args, args_axes=p.args_axes, dt0=0.1,
                      backend="pallas", interpret=True)
    def coupled(t, y, a):  # scalar leaves, but the field mixes them through an array op
        total = jnp.sum(jnp.stack(y))
        return tuple(-a * total * leaf for leaf in y)

    with pytest.raises(ValueError, match=r"uses `(concatenate|reduce_sum|broadcast_in_dim)`.*backend=\"jax\""):
        fusedrk.solve(coupled, (jnp.ones(2), jnp.ones(2)), 0.0, 1.0, args=jnp.asarray(0.5), dt0=0.1,
                      backend="pallas", interpret=True)


def test_auto_chooses_jax_without_a_gpu():
    if HAS_GPU:
        pytest.skip("a GPU is present")
    sol = fusedrk.solve(lambda t, y, a: -y, jnp.ones(3), 0.0, 1.0, dt0=0.1, backend="auto")
    ref = fusedrk.solve(lambda t, y, a: -y, jnp.ones(3), 0.0, 1.0, dt0=0.1, backend="jax")
    np.testing.assert_array_equal(sol.ys, ref.ys)


def _lower_kernels(dtype, adaptive):
    """Trace forward and reverse kernels for CUDA: Triton IR is built here, on any machine."""
    field, y0, args, axes, t0, t1, kw = _setup("adaptive-dict-state", dtype)
    y_flat, treedef = jax.tree_util.tree_flatten(y0)

    def lane_fn(t, y, diff, nondiff):
        out = field(t, jax.tree_util.tree_unflatten(treedef, list(y)), diff[0])
        return tuple(jax.tree_util.tree_leaves(out))

    problem = kernels.TileProblem(lane_fn, (0,), ())
    config = _reference.Config(adaptive=adaptive, save_ts=True, rows=64)

    def run(y_flat, mu):
        direction = jnp.asarray(1, jnp.int32)
        times = _reference.Times(direction=direction, t_start=jnp.asarray(t0, dtype), t_end=jnp.asarray(t1, dtype),
                                 dt0=jnp.asarray(0.01, dtype), ts=kw["ts"].astype(dtype),
                                 rtol=jnp.asarray(1e-6, dtype), atol=jnp.asarray(1e-6, dtype))
        fwd = kernels.forward(config, problem, times, tuple(y_flat), [mu], [], with_tape=True, interpret=False)
        return kernels.backward(config, problem, times, tuple(y_flat), [mu], [], fwd, fwd.ys, interpret=False)

    return jax.jit(run).trace(y_flat, args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernels_lower_to_triton(dtype, adaptive):
    with jax.enable_x64(dtype == "float64"):
        text = _lower_kernels(jnp.dtype(dtype), adaptive)
    assert text.count("__gpu$xla.gpu.triton") == 2  # one forward and one reverse launch


def test_step_algebra_is_shared_not_copied():
    # The kernels reach the step only through fusedrk._step: no coefficients of their own.
    import inspect

    from fusedrk import _tableau

    for module in (kernels.forward, kernels.reverse):
        source = inspect.getsource(inspect.getmodule(module))
        assert "_step." in source
        for value in _tableau.A_LOWER[2] + _tableau.C[1:5]:
            assert repr(value)[:8] not in source
