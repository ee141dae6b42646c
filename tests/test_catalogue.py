"""Fields written the way research code writes them (small arrays per ODE, indexing, stack,
matmul, reductions, jax.nn), run by the kernels in interpret mode and held equal to the jax
backend in float64: values and gradients to F64_TOL, step counts exactly, fixed and adaptive
steps, per-lane and shared arguments."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedrk
from fusedrk import kernels

from conftest import F64_TOL, assert_tree_close


def lorenz(t, y, p):
    x, u, z = y[0], y[1], y[2]
    return jnp.stack([p["s"] * (u - x), x * (p["r"] - z) - u, x * u - p["b"] * z])


def oscillator(t, y, p):  # p = [omega, zeta] per lane
    return jnp.array([y[1], -p[0] ** 2 * y[0] - 2 * p[1] * p[0] * y[1]])


def lotka_volterra(t, y, p):  # growth [5] per lane, interaction [5, 5] shared
    return y * (p["r"] + p["A"] @ y)


def seir(t, y, p):  # p = [beta, sigma, gamma, mu] per lane
    s, e, i, r = y
    beta, sigma, gamma, mu = p[0], p[1], p[2], p[3]
    n = jnp.sum(y)
    return jnp.array([mu * n - beta * s * i / n - mu * s, beta * s * i / n - (sigma + mu) * e,
                      sigma * e - (gamma + mu) * i, gamma * i - mu * r])


def kuramoto(t, theta, p):  # natural frequencies [8] per lane, coupling shared
    return p["omega"] + p["K"] / theta.shape[0] * jnp.sum(jnp.sin(theta[None, :] - theta[:, None]), axis=1)


def neural_ode(t, y, w):  # MLP 4 -> 32 -> 4, shared weights
    h = jnp.tanh(w["W1"] @ y + w["b1"])
    return w["W2"] @ h + w["b2"]


def fitzhugh_nagumo(t, y, p):
    v, w = y[0], y[1]
    return jnp.stack([v - v ** 3 / 3 - w + p["I"], (v + p["a"] - p["b"] * w) / p["tau"]])


def hodgkin_huxley(t, y, p):
    v, m, h, n = y
    am = 0.1 * (v + 40.0) / (1.0 - jnp.exp(-(v + 40.0) / 10.0))
    bm = 4.0 * jnp.exp(-(v + 65.0) / 18.0)
    ah = 0.07 * jnp.exp(-(v + 65.0) / 20.0)
    bh = 1.0 / (1.0 + jnp.exp(-(v + 35.0) / 10.0))
    an = 0.01 * (v + 55.0) / (1.0 - jnp.exp(-(v + 55.0) / 10.0))
    bn = 0.125 * jnp.exp(-(v + 65.0) / 80.0)
    g = p["g"]  # [3] shared conductances
    current = g[0] * m ** 3 * h * (v - 50.0) + g[1] * n ** 4 * (v + 77.0) + g[2] * (v + 54.4)
    return jnp.array([p["I"] - current, am * (1 - m) - bm * m, ah * (1 - h) - bh * h, an * (1 - n) - bn * n])


def double_pendulum(t, y, p):
    th1, th2, w1, w2 = y[0], y[1], y[2], y[3]
    m1, m2, l1, l2, g = p["m1"], p["m2"], p["l"][0], p["l"][1], 9.81
    d = th1 - th2
    den = 2 * m1 + m2 - m2 * jnp.cos(2 * d)
    a1 = (-g * (2 * m1 + m2) * jnp.sin(th1) - m2 * g * jnp.sin(th1 - 2 * th2)
          - 2 * jnp.sin(d) * m2 * (w2 ** 2 * l2 + w1 ** 2 * l1 * jnp.cos(d))) / (l1 * den)
    a2 = 2 * jnp.sin(d) * (w1 ** 2 * l1 * (m1 + m2) + g * (m1 + m2) * jnp.cos(th1) + w2 ** 2 * l2 * m2 * jnp.cos(d)) / (l2 * den)
    return jnp.stack([w1, w2, a1, a2])


def reaction_network(t, c, p):  # stoichiometry [3, 4] shared, rate constants [4] per lane
    a, b, x = c
    rates = p["k"] * jnp.array([a, a * b, x, b ** 2])
    return p["S"] @ rates


def rigid_body(t, w, inertia):  # Euler's equations, principal moments [3] per lane
    return jnp.cross(inertia * w, w) / inertia


def pytree_state(t, y, p):  # a scalar leaf and a [3] leaf
    x, v = y["x"], y["v"]
    return {"x": jnp.dot(v, v) * -p["c"] + 0.1 * x, "v": -p["k"] * v * x + jnp.roll(v, 1) * 0.3}


def piecewise(t, y, p):
    soft = jnp.where(y > 0, jax.nn.softplus(y), jnp.clip(y, -1.0, 1.0))
    return -p * soft + jax.nn.relu(1.0 - y) * 0.5 - jax.nn.sigmoid(y[::-1]) * y


def _lanes(rng, B, shape, lo=0.5, hi=1.5):
    return jnp.asarray(rng.uniform(lo, hi, (B,) + shape))


def _catalogue(B):
    """name -> (field, y0, args, args_axes, dt0, t1)."""
    rng = np.random.default_rng(0)
    mlp = {"W1": rng.normal(size=(32, 4)) / 2, "b1": rng.normal(size=32) / 4, "W2": rng.normal(size=(4, 32)) / 4,
           "b2": rng.normal(size=4) / 4}
    mlp = jax.tree_util.tree_map(jnp.asarray, mlp)
    return {
        "lorenz-vector": (lorenz, _lanes(rng, B, (3,)), {"s": jnp.asarray(10.0), "r": _lanes(rng, B, (), 20, 30), "b": jnp.asarray(8 / 3)},
                          {"s": None, "r": 0, "b": None}, 0.01, 0.05),
        "oscillator": (oscillator, _lanes(rng, B, (2,)), _lanes(rng, B, (2,), 0.2, 2.0), 0, 0.1, 0.5),
        "lotka-volterra-5": (lotka_volterra, _lanes(rng, B, (5,)), {"r": _lanes(rng, B, (5,)), "A": -jnp.asarray(rng.uniform(0.1, 1, (5, 5)))},
                             {"r": 0, "A": None}, 0.05, 0.3),
        "seir": (seir, _lanes(rng, B, (4,), 0.1, 1.0), _lanes(rng, B, (4,), 0.1, 0.5), 0, 0.1, 0.5),
        "kuramoto-8": (kuramoto, _lanes(rng, B, (8,), -3, 3), {"omega": _lanes(rng, B, (8,)), "K": jnp.asarray(2.0)},
                       {"omega": 0, "K": None}, 0.05, 0.3),
        "neural-ode-mlp": (neural_ode, _lanes(rng, B, (4,), -1, 1), mlp, None, 0.05, 0.3),
        "fitzhugh-nagumo": (fitzhugh_nagumo, _lanes(rng, B, (2,), -1, 1), {"I": _lanes(rng, B, ()), "a": jnp.asarray(0.7), "b": jnp.asarray(0.8), "tau": jnp.asarray(12.5)},
                            {"I": 0, "a": None, "b": None, "tau": None}, 0.1, 0.5),
        "hodgkin-huxley": (hodgkin_huxley, jnp.stack([_lanes(rng, B, (), -70, -60), _lanes(rng, B, (), 0.05, 0.1), _lanes(rng, B, (), 0.5, 0.6), _lanes(rng, B, (), 0.3, 0.4)], 1),
                           {"I": _lanes(rng, B, (), 5, 15), "g": jnp.asarray([120.0, 36.0, 0.3])}, {"I": 0, "g": None}, 0.01, 0.05),
        "double-pendulum": (double_pendulum, _lanes(rng, B, (4,), -1, 1), {"m1": jnp.asarray(1.0), "m2": _lanes(rng, B, ()), "l": _lanes(rng, B, (2,))},
                            {"m1": None, "m2": 0, "l": 0}, 0.02, 0.1),
        "reaction-network": (reaction_network, _lanes(rng, B, (3,)), {"S": jnp.asarray([[-1.0, -1, 0, 0], [0, -1, 1, -2], [1, 1, -1, 0]]), "k": _lanes(rng, B, (4,))},
                             {"S": None, "k": 0}, 0.05, 0.3),
        "rigid-body": (rigid_body, _lanes(rng, B, (3,), -1, 1), _lanes(rng, B, (3,), 1, 3), 0, 0.05, 0.3),
        "pytree-state": (pytree_state, {"x": _lanes(rng, B, ()), "v": _lanes(rng, B, (3,))}, {"c": jnp.asarray(0.2), "k": _lanes(rng, B, ())},
                         {"c": None, "k": 0}, 0.05, 0.3),
        "piecewise": (piecewise, _lanes(rng, B, (3,), -2, 2), _lanes(rng, B, (), 0.5, 2), 0, 0.05, 0.3),
    }


NAMES = sorted(_catalogue(1))
# The MLP unfolds into ~300 tile products per evaluation: correct on the grid (its jaxpr is
# evaluated like the others), but XLA:CPU compiles the interpret-mode kernels of its gradient
# out of memory (the forward kernel alone: 61 s, 3 GB). Not run here until that is solved.
TOO_BIG_FOR_INTERPRET = {"neural-ode-mlp"}


# Each field once, alternating fixed and adaptive steps, to keep the interpret-mode suite
# within CI's time (each case compiles two kernels and their gradients: ~25 s on 2 cores).
CASES = [(name, i % 2 == 1) for i, name in enumerate(NAMES)]


@pytest.mark.parametrize("name, adaptive", CASES, ids=[f"{n}-{'adaptive' if a else 'fixed'}" for n, a in CASES])
def test_kernels_equal_the_jax_backend(x64, name, adaptive):
    if name in TOO_BIG_FOR_INTERPRET:
        pytest.skip("interpret-mode compile of this field's kernels runs out of memory on XLA:CPU")
    field, y0, args, axes, dt0, t1 = jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, jnp.float64) if isinstance(x, jax.Array) else x, _catalogue(3)[name])
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
