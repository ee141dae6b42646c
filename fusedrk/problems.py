"""Named ODE problems shared by the tests, the benchmarks and the demonstration.

Owns: each problem's vector field (written for ONE ODE, as ``fusedrk.solve`` and diffrax take
it), a batch of initial states and arguments, and the time interval. Nothing here solves.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Problem(NamedTuple):
    name: str
    field: Callable  # f(t, y, args) for one ODE
    make: Callable  # make(B, dtype) -> (y0, args), leaves of y0 with leading axis B
    args_axes: Any  # jax.vmap-style prefix of args: 0 per lane, None shared
    t0: float
    t1: float
    dt0: float  # fixed step (or the first step of an adaptive solve)


def _lanes(B, lo, hi, dtype):
    return jnp.linspace(lo, hi, B, dtype=dtype) if B > 1 else jnp.full((1,), lo, dtype)


# -- the project's seed workload (docs/design.md): 2,250 independent scalar ODEs ------------


SEED_DECAY = 0.1  # the seed's rate: d y(t1) / d y0 = exp(-SEED_DECAY (t1 - t0))


def seed_field(t, y, args):
    return -SEED_DECAY * y + 0.1 * jnp.sin(0.2 * t)


def seed_loss_scale(t0: float, t1: float) -> float:
    """A constant factor for a loss on the seed's y(t1) that undoes the decay of its gradient.

    Unscaled, d y(t1) / d y0 = exp(-0.1 (t1 - t0)) is 1.8e-35 at t1 = 800: near float32's
    smallest normal number, where flush-to-zero of the intermediate cotangents makes equally
    valid summation orders disagree by 1e-2 and an accuracy check says nothing. Capped at e^80
    (float32 overflows past e^88); longer horizons have a gradient that underflows to zero
    anyway, which costs the same to compute.
    """
    return math.exp(min(SEED_DECAY * (t1 - t0), 80.0))


def seed_nl_field(t, y, args):
    # The seed's Jacobian is constant; this one depends on the state, so the reverse sweep
    # must read the stored stages.
    return -1e-4 * y + 0.1 * jnp.sin(0.2 * t + y)


SEED = Problem("seed", seed_field, lambda B, dt: (_lanes(B, 0.5, 1.5, dt), None), None, 0.0, 8000.0, 0.1)
SEED_NL = Problem("seed-nl", seed_nl_field, SEED.make, None, 0.0, 8000.0, 0.1)


# -- small classics --------------------------------------------------------------------------


def decay_field(t, y, args):
    return -args["k"] * y + args["c"] * jnp.cos(t)


DECAY = Problem(
    "decay",
    decay_field,
    lambda B, dt: (_lanes(B, 0.5, 1.5, dt), {"k": _lanes(B, 0.2, 2.0, dt), "c": jnp.asarray(0.3, dt)}),
    {"k": 0, "c": None},
    0.0,
    3.0,
    0.1,
)


def lorenz_field(t, y, args):
    x, u, z = y
    sigma, beta = 10.0, 8.0 / 3.0
    return (sigma * (u - x), x * (args - z) - u, x * u - beta * z)


LORENZ = Problem(
    "lorenz",
    lorenz_field,
    lambda B, dt: (
        (jnp.ones((B,), dt), jnp.zeros((B,), dt), jnp.zeros((B,), dt)),
        _lanes(B, 20.0, 30.0, dt),  # one rho per member
    ),
    0,
    0.0,
    1.0,
    0.001,
)


def vdp_field(t, y, args):
    x, v = y["x"], y["v"]
    return {"x": v, "v": args * (1 - x * x) * v - x}


VDP = Problem(
    "vdp",
    vdp_field,
    lambda B, dt: ({"x": _lanes(B, 1.0, 2.0, dt), "v": jnp.zeros((B,), dt)}, _lanes(B, 0.5, 3.0, dt)),
    0,
    0.0,
    6.0,
    0.01,
)


def lotka_volterra_field(t, y, args):
    prey, predator = y[0], y[1]
    return jnp.stack([args["a"] * prey - args["b"] * prey * predator,
                      args["d"] * prey * predator - args["g"] * predator])


LOTKA_VOLTERRA = Problem(
    "lotka-volterra",
    lotka_volterra_field,
    lambda B, dt: (
        jnp.stack([_lanes(B, 5.0, 12.0, dt), _lanes(B, 2.0, 4.0, dt)], axis=1),
        {"a": _lanes(B, 0.9, 1.2, dt), "b": jnp.asarray(0.1, dt), "d": jnp.asarray(0.075, dt), "g": _lanes(B, 1.2, 1.8, dt)},
    ),
    {"a": 0, "b": None, "d": None, "g": 0},
    0.0,
    10.0,
    0.05,
)


def linear_field(t, y, args):
    # Not elementwise: a shared 4x4 matrix couples the components of each lane's state.
    return args["A"] @ y + args["b"] * jnp.sin(t)


def _linear_make(B, dt):
    A = jnp.asarray(
        [[-0.5, 1.0, 0.0, 0.2], [-1.0, -0.3, 0.4, 0.0], [0.0, -0.2, -0.1, 1.5], [0.1, 0.0, -1.5, -0.2]],
        dt,
    )
    y0 = jnp.stack([_lanes(B, 0.5, 1.0, dt), _lanes(B, -1.0, 1.0, dt), jnp.ones((B,), dt), _lanes(B, 0.0, 0.3, dt)], axis=1)
    return y0, {"A": A, "b": jnp.stack([_lanes(B, 0.1, 0.5, dt)] * 4, axis=1)}


LINEAR = Problem("linear", linear_field, _linear_make, {"A": None, "b": 0}, 0.0, 4.0, 0.05)

PROBLEMS = {p.name: p for p in (SEED, SEED_NL, DECAY, LORENZ, VDP, LOTKA_VOLTERRA, LINEAR)}


# -- the catalogue: fields written the way research code writes them ------------------------
# Small arrays per ODE, indexing, stack, matmul, reductions, jax.nn; per-lane and shared
# arguments. The kernels must take every one (tests/test_catalogue.py holds them equal to the
# jax backend; bench/compile_check.py compiles them for an H100).


def lorenz_vector_field(t, y, p):  # the state as a [3] vector (LORENZ above: three scalar leaves)
    x, u, z = y[0], y[1], y[2]
    return jnp.stack([p["s"] * (u - x), x * (p["r"] - z) - u, x * u - p["b"] * z])


def lorenz_tuple_field(t, y, p):
    """``lorenz_vector_field`` with the state as three scalar leaves: the kernels must make the
    same program of both (bench/compile_check.py, bench/gpu_check.py)."""
    x, u, z = y
    return (p["s"] * (u - x), x * (p["r"] - z) - u, x * u - p["b"] * z)


def oscillator_field(t, y, p):  # p = [omega, zeta] per lane
    return jnp.array([y[1], -p[0] ** 2 * y[0] - 2 * p[1] * p[0] * y[1]])


def lotka_volterra_n_field(t, y, p):  # growth [N] per lane, interaction [N, N] shared
    return y * (p["r"] + p["A"] @ y)


def seir_field(t, y, p):  # p = [beta, sigma, gamma, mu] per lane
    s, e, i, r = y
    beta, sigma, gamma, mu = p[0], p[1], p[2], p[3]
    n = jnp.sum(y)
    return jnp.array([mu * n - beta * s * i / n - mu * s, beta * s * i / n - (sigma + mu) * e,
                      sigma * e - (gamma + mu) * i, gamma * i - mu * r])


def kuramoto_field(t, theta, p):  # natural frequencies [N] per lane, coupling shared
    return p["omega"] + p["K"] / theta.shape[0] * jnp.sum(jnp.sin(theta[None, :] - theta[:, None]), axis=1)


def mlp_weights(rng, hidden: int, dtype=jnp.float32) -> dict:
    """Shared weights of ``neural_ode_field`` (4 -> hidden -> 4), drawn from ``rng``."""
    weights = {"W1": rng.normal(size=(hidden, 4)) / 2, "b1": rng.normal(size=hidden) / 4,
               "W2": rng.normal(size=(4, hidden)) / 4, "b2": rng.normal(size=4) / 4}
    return {k: jnp.asarray(w, dtype) for k, w in weights.items()}


def neural_ode_field(t, y, w):  # MLP 4 -> hidden -> 4 (the catalogue: 32), shared weights
    h = jnp.tanh(w["W1"] @ y + w["b1"])
    return w["W2"] @ h + w["b2"]


def fitzhugh_nagumo_field(t, y, p):
    v, w = y[0], y[1]
    return jnp.stack([v - v ** 3 / 3 - w + p["I"], (v + p["a"] - p["b"] * w) / p["tau"]])


def hodgkin_huxley_field(t, y, p):
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


def double_pendulum_field(t, y, p):
    th1, th2, w1, w2 = y[0], y[1], y[2], y[3]
    m1, m2, l1, l2, g = p["m1"], p["m2"], p["l"][0], p["l"][1], 9.81
    d = th1 - th2
    den = 2 * m1 + m2 - m2 * jnp.cos(2 * d)
    a1 = (-g * (2 * m1 + m2) * jnp.sin(th1) - m2 * g * jnp.sin(th1 - 2 * th2)
          - 2 * jnp.sin(d) * m2 * (w2 ** 2 * l2 + w1 ** 2 * l1 * jnp.cos(d))) / (l1 * den)
    a2 = 2 * jnp.sin(d) * (w1 ** 2 * l1 * (m1 + m2) + g * (m1 + m2) * jnp.cos(th1) + w2 ** 2 * l2 * m2 * jnp.cos(d)) / (l2 * den)
    return jnp.stack([w1, w2, a1, a2])


def reaction_network_field(t, c, p):  # stoichiometry [3, 4] shared, rate constants [4] per lane
    a, b, x = c
    rates = p["k"] * jnp.array([a, a * b, x, b ** 2])
    return p["S"] @ rates


def rigid_body_field(t, w, inertia):  # Euler's equations, principal moments [3] per lane
    return jnp.cross(inertia * w, w) / inertia


def pytree_state_field(t, y, p):  # a scalar leaf and a [3] leaf
    x, v = y["x"], y["v"]
    return {"x": jnp.dot(v, v) * -p["c"] + 0.1 * x, "v": -p["k"] * v * x + jnp.roll(v, 1) * 0.3}


def piecewise_field(t, y, p):
    soft = jnp.where(y > 0, jax.nn.softplus(y), jnp.clip(y, -1.0, 1.0))
    return -p * soft + jax.nn.relu(1.0 - y) * 0.5 - jax.nn.sigmoid(y[::-1]) * y


def pendulum_cost_field(t, y, p):  # [angle, velocity, running cost of the angle's error]
    theta, omega = y[0], y[1]
    return jnp.stack([omega, -p["g"] * jnp.sin(theta) + p["u"] * jnp.cos(2.0 * t), (theta - p["target"]) ** 2])


class Case(NamedTuple):
    """One catalogue entry, built for a batch: solve from t = 0 to ``t1``."""

    field: Callable
    y0: Any  # leaves with leading axis B
    args: Any
    args_axes: Any
    dt0: float
    t1: float


def catalogue(B: int, dtype=jnp.float32) -> dict:
    """name -> Case for B lanes, every array in ``dtype`` (float64 needs jax_enable_x64).

    Values come from one seeded generator, drawn in the order below: a given B gives the same
    numbers in every dtype."""
    rng = np.random.default_rng(0)
    a = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    lanes = lambda shape, lo=0.5, hi=1.5: a(rng.uniform(lo, hi, (B,) + shape))  # noqa: E731
    mlp = mlp_weights(rng, 32, dtype)
    return {
        "lorenz-vector": Case(lorenz_vector_field, lanes((3,)), {"s": a(10.0), "r": lanes((), 20, 30), "b": a(8 / 3)},
                              {"s": None, "r": 0, "b": None}, 0.01, 0.05),
        "oscillator": Case(oscillator_field, lanes((2,)), lanes((2,), 0.2, 2.0), 0, 0.1, 0.5),
        "lotka-volterra-5": Case(lotka_volterra_n_field, lanes((5,)), {"r": lanes((5,)), "A": -a(rng.uniform(0.1, 1, (5, 5)))},
                                 {"r": 0, "A": None}, 0.05, 0.3),
        "seir": Case(seir_field, lanes((4,), 0.1, 1.0), lanes((4,), 0.1, 0.5), 0, 0.1, 0.5),
        "kuramoto-8": Case(kuramoto_field, lanes((8,), -3, 3), {"omega": lanes((8,)), "K": a(2.0)},
                           {"omega": 0, "K": None}, 0.05, 0.3),
        "neural-ode-mlp": Case(neural_ode_field, lanes((4,), -1, 1), mlp, None, 0.05, 0.3),
        "fitzhugh-nagumo": Case(fitzhugh_nagumo_field, lanes((2,), -1, 1), {"I": lanes(()), "a": a(0.7), "b": a(0.8), "tau": a(12.5)},
                                {"I": 0, "a": None, "b": None, "tau": None}, 0.1, 0.5),
        "hodgkin-huxley": Case(hodgkin_huxley_field, jnp.stack([lanes((), -70, -60), lanes((), 0.05, 0.1), lanes((), 0.5, 0.6), lanes((), 0.3, 0.4)], 1),
                               {"I": lanes((), 5, 15), "g": a([120.0, 36.0, 0.3])}, {"I": 0, "g": None}, 0.01, 0.05),
        "double-pendulum": Case(double_pendulum_field, lanes((4,), -1, 1), {"m1": a(1.0), "m2": lanes(()), "l": lanes((2,))},
                                {"m1": None, "m2": 0, "l": 0}, 0.02, 0.1),
        "reaction-network": Case(reaction_network_field, lanes((3,)), {"S": a([[-1.0, -1, 0, 0], [0, -1, 1, -2], [1, 1, -1, 0]]), "k": lanes((4,))},
                                 {"S": None, "k": 0}, 0.05, 0.3),
        "rigid-body": Case(rigid_body_field, lanes((3,), -1, 1), lanes((3,), 1, 3), 0, 0.05, 0.3),
        "pytree-state": Case(pytree_state_field, {"x": lanes(()), "v": lanes((3,))}, {"c": a(0.2), "k": lanes(())},
                             {"c": None, "k": 0}, 0.05, 0.3),
        "piecewise": Case(piecewise_field, lanes((3,), -2, 2), lanes((), 0.5, 2), 0, 0.05, 0.3),
        # Its VJP reads the angle only (the velocity enters linearly, the cost not at all): the
        # tape stores one component of three (fusedrk/_liveness.py).
        "pendulum-cost": Case(pendulum_cost_field, jnp.stack([lanes((), -1, 1), lanes((), -1, 1), a(np.zeros(B))], 1),
                              {"g": lanes((), 5, 15), "u": a(0.5), "target": lanes(())}, {"g": 0, "u": None, "target": 0},
                              0.05, 0.3),
    }


# catalogue()'s keys, sorted, without building any array.
CATALOGUE_NAMES = ("double-pendulum", "fitzhugh-nagumo", "hodgkin-huxley", "kuramoto-8", "lorenz-vector",
                   "lotka-volterra-5", "neural-ode-mlp", "oscillator", "pendulum-cost", "piecewise", "pytree-state",
                   "reaction-network", "rigid-body", "seir")
