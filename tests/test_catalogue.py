"""Fields written the way research code writes them (``fusedrk.problems.catalogue``: small
arrays per ODE, indexing, stack, matmul, reductions, jax.nn), run by the kernels in interpret
mode and held equal to the jax backend in float64: values and gradients to F64_TOL, step counts
exactly, fixed and adaptive steps, per-lane and shared arguments."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedrk
from fusedrk import kernels, problems

from conftest import F64_TOL, assert_tree_close


NAMES = problems.CATALOGUE_NAMES


# Each field once, about half with adaptive steps, to keep the interpret-mode suite within
# CI's time (each case compiles two kernels and their gradients: ~25 s on 2 cores). Named, not
# alternating: piecewise, whose field jumps at y = 0, exhausts max_steps with adaptive steps.
ADAPTIVE = {"fitzhugh-nagumo", "kuramoto-8", "lotka-volterra-5", "oscillator", "pytree-state", "rigid-body"}
CASES = [(name, name in ADAPTIVE) for name in NAMES]


@pytest.mark.parametrize("name, adaptive", CASES, ids=[f"{n}-{'adaptive' if a else 'fixed'}" for n, a in CASES])
def test_kernels_equal_the_jax_backend(x64, name, adaptive):
    field, y0, args, axes, dt0, t1 = problems.catalogue(3, jnp.float64)[name]
    ts = jnp.linspace(0.0, t1, 3)
    tol = dict(rtol=1e-6, atol=1e-8) if adaptive else {}

    def run(backend, y0, args):
        sol = fusedrk.solve(field, y0, 0.0, t1, args=args, args_axes=axes, dt0=dt0, ts=ts, backend=backend,
                            interpret=backend == "pallas", **tol)
        loss = sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(sol.ys))
        return loss, sol

    grad = jax.value_and_grad(run, argnums=(1, 2), has_aux=True)
    (value, sol), grads = grad("pallas", y0, args)
    (ref_value, ref), ref_grads = grad("jax", y0, args)
    np.testing.assert_array_equal(sol.stats["num_steps"], ref.stats["num_steps"])
    np.testing.assert_array_equal(sol.result, ref.result)
    assert int(np.min(ref.stats["num_steps"])) >= 2
    assert_tree_close(sol.ys, ref.ys, rtol=F64_TOL)
    np.testing.assert_allclose(value, ref_value, rtol=F64_TOL)
    assert_tree_close(grads, ref_grads, rtol=F64_TOL)


def _refusal(field, y0, args=None, args_axes=None):
    with pytest.raises(ValueError) as info:
        fusedrk.solve(field, y0, 0.0, 0.1, args=args, args_axes=args_axes, dt0=0.05, backend="pallas",
                      interpret=True)
    message = str(info.value)
    assert 'backend="jax"' in message
    return message


def test_data_dependent_indexing_is_refused_with_its_place():
    def field(t, y, a):
        return -y * y[(y[0] > 0).astype(jnp.int32)]  # an index computed from the state

    message = _refusal(field, jnp.ones((2, 3)))
    assert "data-dependent indexing" in message and "test_catalogue.py" in message


def test_loops_inside_the_field_are_refused():
    def field(t, y, a):
        return jax.lax.fori_loop(0, 3, lambda i, v: v * 0.5, y)

    assert "loops" in _refusal(field, jnp.ones((2, 3)))


def test_random_numbers_inside_the_field_are_refused():
    def field(t, y, a):
        return -y + jax.random.normal(jax.random.PRNGKey(0), y.shape)

    assert "random" in _refusal(field, jnp.ones((2, 3)))


def test_a_lane_with_too_many_components_is_refused():
    n = kernels._problem.MAX_STATE_COMPONENTS + 1
    message = _refusal(lambda t, y, a: -y, jnp.ones((2, n)))
    assert f"{n} state components" in message


def test_a_field_closing_over_a_traced_array_is_refused():
    @jax.jit
    def run(scale):
        return fusedrk.solve(lambda t, y, a: -scale * y, jnp.ones((2, 3)), 0.0, 0.1, dt0=0.05, backend="pallas",
                             interpret=True).ys

    with pytest.raises(ValueError, match=r"closes over a traced array.*args.*backend=\"jax\""):
        run(jnp.asarray(2.0))


class _Chosen(Exception):
    pass


def _auto_choice(monkeypatch, field, y0, args, axes, dt0, t1):
    """The backend solve(backend="auto") picks with the device reported as a GPU: the real
    decision in solve, with the core replaced by a recorder."""
    from fusedrk import _solve

    chosen = {}

    def record(*args, backend, **kwargs):
        chosen["backend"] = backend
        raise _Chosen

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(_solve, "_check_pallas_device", lambda backend, interpret: None)
    monkeypatch.setattr(_solve, "_make_core", record)
    with pytest.raises(_Chosen):
        fusedrk.solve(field, y0, 0.0, t1, args=args, args_axes=axes, dt0=dt0, rtol=1e-6, atol=1e-6)
    return chosen["backend"]


@pytest.mark.parametrize("name", NAMES)
def test_auto_picks_the_kernels_on_a_gpu(monkeypatch, name):
    """backend="auto" on a GPU takes the kernels for every catalogue field they take."""
    field, y0, args, axes, dt0, t1 = problems.catalogue(3, jnp.float32)[name]
    assert _auto_choice(monkeypatch, field, y0, args, axes, dt0, t1) == "pallas"


def _mlp(hidden):
    return problems.mlp_weights(np.random.default_rng(0), hidden)


def test_a_field_too_large_to_compile_is_refused(monkeypatch):
    # The same MLP at three widths: with 31 hidden units the field and its VJP unfold into ~3,300
    # tile operations (refused, with the count: an odd width keeps the weights off blocks); with
    # 8 or 32 the weight matrices are blocks and it unfolds into ~250 or ~160 (taken).
    y0 = jnp.ones((2, 4))
    message = _refusal(problems.neural_ode_field, y0, _mlp(31))
    count = int(message.split("unfold into ")[1].split(" ")[0])
    assert count > kernels._problem.MAX_TILE_OPERATIONS and "MAX_TILE_OPERATIONS" in message
    assert "powers of" in message
    for hidden, backend in ((8, "pallas"), (31, "jax"), (32, "pallas")):
        assert _auto_choice(monkeypatch, problems.neural_ode_field, y0, _mlp(hidden), None, 0.05, 0.1) == backend
