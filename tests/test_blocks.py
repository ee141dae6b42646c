"""Shared weight matrices held whole as blocks (``kernels._grid.Block``): the field and its VJP
evaluated on lane tiles, as the kernels do, equal ``jax.vmap`` of the field and of its VJP, for
matrix products in every axis order, batched contractions, outer products, reductions,
broadcasts, reshapes and primitives that have no block form (their operands are split into
components first). No kernel runs here: the tile evaluation is checked on its own, fast."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedrk import kernels
from fusedrk.kernels import _grid, _problem

from conftest import F64_TOL


def _weights(rng, *shapes):
    return [jnp.asarray(rng.normal(size=s) / math.sqrt(max(s)), jnp.float64) for s in shapes]


# (field(t, y, w), per-lane state size, shapes of the shared weights)
FIELDS = {
    "matvec": (lambda t, y, w: w[1] @ jnp.tanh(w[0] @ y + w[2]) + t, 4, [(32, 4), (4, 32), (32,)]),
    "vecmat": (lambda t, y, w: jnp.sin(y @ w[0]) @ w[1], 4, [(4, 16), (16, 4)]),
    "transposed": (lambda t, y, w: w[1].T @ jax.nn.softplus(w[0].T @ y), 4, [(4, 32), (32, 4)]),
    "einsum-batch": (lambda t, y, w: jnp.einsum("bij,j->i", w[0], y).reshape(4) * y, 4, [(2, 4, 4)]),
    "outer-reduce": (lambda t, y, w: jnp.max(jnp.outer(y, w[0]) * w[1], axis=1) + jnp.sum(w[1], axis=1),
                     4, [(16,), (4, 16)]),
    "sliced": (lambda t, y, w: w[0][0:4] * y - jnp.stack([w[0][5], w[0][7], y[1], y[0]]), 4, [(16,)]),
    "relu-where": (lambda t, y, w: w[1] @ jnp.where(w[0] @ y > 0, jax.nn.relu(w[0] @ y), -0.1 * (w[0] @ y)),
                   2, [(16, 2), (2, 16)]),
}


@pytest.mark.parametrize("name", FIELDS)
def test_blocks_equal_vmap(x64, name):
    fn, n, shapes = FIELDS[name]
    rng = np.random.default_rng(1)
    lanes = 8
    weights = _weights(rng, *shapes)
    y = jnp.asarray(rng.normal(size=(lanes, n)))
    f_bar = jnp.asarray(rng.normal(size=(lanes, n)))
    t = jnp.linspace(0.1, 0.9, lanes)

    def lane_fn(t, y_leaves, diff, nondiff):
        return (fn(t, y_leaves[0], diff),)

    problem = kernels.TileProblem(lane_fn, (None,) * len(weights), ())
    tiles = problem.on_tiles((y,), weights, [], jnp.float64)
    held = [_problem.held_whole(w.shape, None) for w in weights]
    assert any(held), "the test must exercise blocks"
    inputs, axes = tiles.arg_inputs(weights, [])
    d, nd = tiles.load_args([_problem._Loaded(x, a) for x, a in zip(inputs, axes)], slice(None))
    assert [isinstance(g, _grid.Block) for g in d] == held
    comps = tuple(y[:, j] for j in range(n))

    out = jnp.stack(tiles.field(t, comps, d, nd), axis=-1)
    expected = jax.vmap(lambda t, y: fn(t, y, weights))(t, y)
    np.testing.assert_allclose(out, expected, rtol=F64_TOL, atol=F64_TOL)

    y_bar, d_bar = tiles.vjp(t, comps, d, nd, tuple(f_bar[:, j] for j in range(n)))
    _, pull = jax.vjp(lambda y, w: jax.vmap(lambda t, y: fn(t, y, w))(t, y), y, weights)
    y_bar_ref, w_bar_ref = pull(f_bar)
    np.testing.assert_allclose(jnp.stack(y_bar, axis=-1), y_bar_ref, rtol=F64_TOL, atol=F64_TOL)
    slots = iter(d_bar)
    for w, w_bar, whole in zip(weights, w_bar_ref, held):
        # A block's cotangent comes summed over the tile; a component's per lane.
        got = next(slots) if whole else jnp.stack([jnp.sum(next(slots)) for _ in range(w.size)]).reshape(w.shape)
        np.testing.assert_allclose(got, w_bar, rtol=F64_TOL, atol=F64_TOL)


def test_a_neural_field_on_blocks_is_a_few_operations():
    """The MLP's matrix products as blocks: a few hundred tile operations, not one per weight
    (the same field with an odd width, whose weights cannot be blocks, unfolds into thousands)."""
    from fusedrk import problems

    def count(hidden):
        w = problems.mlp_weights(np.random.default_rng(0), hidden)
        leaves, treedef = jax.tree_util.tree_flatten(w)
        problem = kernels.TileProblem(
            lambda t, y, d, n: (problems.neural_ode_field(t, y[0], jax.tree_util.tree_unflatten(treedef, d)),),
            (None,) * len(leaves), ())
        reason = _problem.unsupported_reason(problem, (jnp.ones((4, 4)),), leaves, [], jnp.float32,
                                             max_operations=0)
        return int(reason.split("unfold into ")[1].split(" ")[0])

    blocked, unfolded = count(32), count(31)
    assert blocked < 300 < 3000 < unfolded


def test_a_field_with_blocks_in_the_kernels_over_several_tiles(x64):
    """Blocks through both kernels: 20 lanes make two tiles of 16 (blocks take the smallest
    tile) and 12 padded lanes, adaptive steps; values, step counts and gradients (the weights'
    come back as per-tile partial sums) equal the jax backend."""
    import fusedrk
    from fusedrk import problems
    from fusedrk.kernels import _triton

    rng = np.random.default_rng(2)
    weights = problems.mlp_weights(rng, 16, jnp.float64)
    y0 = jnp.asarray(rng.uniform(-1, 1, (20, 4)))
    assert _triton.padded_batch(20, blocks=True) == 32
    ts = jnp.asarray([0.1, 0.3])

    def run(backend, y0, w):
        sol = fusedrk.solve(problems.neural_ode_field, y0, 0.0, 0.3, args=w, dt0=0.05, ts=ts, rtol=1e-6, atol=1e-8,
                            backend=backend, interpret=backend == "pallas")
        return jnp.sum(jnp.sin(sol.ys)), sol

    grad = jax.value_and_grad(run, argnums=(1, 2), has_aux=True)
    (value, sol), grads = grad("pallas", y0, weights)
    (ref_value, ref), ref_grads = grad("jax", y0, weights)
    np.testing.assert_array_equal(sol.stats["num_steps"], ref.stats["num_steps"])
    np.testing.assert_allclose(sol.ys, ref.ys, rtol=F64_TOL, atol=F64_TOL)
    np.testing.assert_allclose(value, ref_value, rtol=F64_TOL)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=F64_TOL, atol=F64_TOL)
