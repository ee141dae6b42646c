"""Named ODE problems shared by the tests, the benchmarks and the demonstration.

Owns: each problem's vector field (written for ONE ODE, as ``fusedrk.solve`` and diffrax take
it), a batch of initial states and arguments, and the time interval. Nothing here solves.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp


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
