"""Optional peers, timed beside fusedrk and diffrax when importable: torchode, torchdiffeq, gradsolve.

What each runs, on the fixed-step workloads only (seed, seed-nl, lorenz): with adaptive steps
each library's controller takes its own steps, and its results could not be checked against
the oracle at the rounding level every other row is held to.

- ``torchode``: its Tsit5 with ``FixedStepController`` and dt0 = the workload's step, one
  batch of B problems, gradients by autograd through the steps (``AutoDiffAdjoint``).
- ``torchdiffeq``: it has no Tsit5; its fixed-grid ``rk4`` with ``step_size`` = the
  workload's step, autograd through the steps. Its values differ from Tsit5's by RK4's
  truncation error; the row's error columns say by how much.
- ``gradsolve``: its fixed-step Tsit5 (``gradsolve.solvers.fixed_step_tsit5``, a ``lax.scan``
  over the steps under ``jax.vmap``, save times by re-stepping), ``jax.jit(jax.grad(...))``.

The torch peers need the workload's vector field in torch: ``_torch_field`` holds those three
(the same formulas as ``fusedrk.problems``; the error columns check them against the oracle).
gradsolve takes the JAX fields of ``fusedrk.problems`` as they are.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusedrk import problems

PEERS = ("torchode", "torchdiffeq", "gradsolve")
WORKLOADS = ("seed", "seed-nl", "lorenz")


def missing(peer: str) -> str | None:
    """Why ``peer`` cannot run here, or None when it can."""
    needs = (peer, "torch") if peer.startswith("torch") else (peer,)
    absent = [name for name in needs if importlib.util.find_spec(name) is None]
    return f"{' and '.join(absent)} not installed" if absent else None


class PeerRun(NamedTuple):
    grad: Callable  # params -> gradient of the workload's loss
    forward: Callable  # params -> ys in the oracle's layout
    sync: Callable  # waits for the device to finish a result (timing)


class Spec(NamedTuple):
    """One case as the peers need it (see bench/__main__.py's Case). The gradient is taken
    with respect to y0 for the seeds and rho for lorenz."""

    workload: str
    y0: object  # pytree of (B,) arrays, as fusedrk.problems makes it
    t0: float
    t1: float
    dt0: float
    ts: object  # save times (lorenz) or None: the state at t1 only (seed)
    # The workload's loss of ys in the oracle's layout, written with array methods (.sum(),
    # .mean()) so that it takes torch tensors as well as JAX arrays.
    loss: Callable


def run(peer: str, spec: Spec) -> PeerRun:
    return {"torchode": _torch, "torchdiffeq": _torch, "gradsolve": _gradsolve}[peer](peer, spec)


# -- torch peers ----------------------------------------------------------------------------------


def _torch_field(workload):
    import torch

    if workload == "seed":
        return lambda t, y, p: -problems.SEED_DECAY * y + 0.1 * torch.sin(0.2 * t)
    if workload == "seed-nl":
        return lambda t, y, p: -1e-4 * y + 0.1 * torch.sin(0.2 * t + y)

    def lorenz(t, y, rho):
        x, u, z = y.unbind(-1)
        return torch.stack((10.0 * (u - x), x * (rho - z) - u, x * u - (8.0 / 3.0) * z), dim=-1)

    return lorenz


def _torch(peer, spec: Spec) -> PeerRun:
    import torch

    lorenz = spec.workload == "lorenz"
    field = _torch_field(spec.workload)
    y0 = torch.from_numpy(np.stack([np.asarray(x) for x in jax.tree_util.tree_leaves(spec.y0)], axis=-1))
    times = [spec.t0, *np.asarray(spec.ts).tolist()] if lorenz else [spec.t0, spec.t1]
    B = y0.shape[0]

    def solve(params):
        """ys at the save times, shape (B, n_saves, state)."""
        y_init, rho = (y0, params) if lorenz else (params[:, None], None)
        if peer == "torchode":
            import torchode as to

            # torchode hands the field one time per batch member: (B,) against a (B, state) y.
            method = to.Tsit5(term=to.ODETerm(lambda t, y, p: field(t[:, None], y, p), with_args=True))
            solver = to.AutoDiffAdjoint(method, to.FixedStepController(),
                                        max_steps=int(round((times[-1] - spec.t0) / spec.dt0)) + 2)
            t_eval = torch.tensor(times, dtype=y_init.dtype).expand(B, -1)
            sol = solver.solve(to.InitialValueProblem(y0=y_init, t_eval=t_eval),
                               dt0=torch.full((B,), spec.dt0, dtype=y_init.dtype),
                               args=rho if lorenz else torch.zeros(B, dtype=y_init.dtype))
            return sol.ys[:, 1:]
        import torchdiffeq

        ys = torchdiffeq.odeint(lambda t, y: field(t, y, rho), y_init, torch.tensor(times, dtype=y_init.dtype),
                                method="rk4", options=dict(step_size=spec.dt0))
        return ys[1:].transpose(0, 1)

    def layout(ys):  # the oracle's: a tuple of (B, n_saves) per component, or y(t1) as (B,)
        return tuple(ys[..., i] for i in range(ys.shape[-1])) if lorenz else ys[:, -1, 0]

    def grad(params):
        x = torch.tensor(np.asarray(params), requires_grad=True)
        (g,) = torch.autograd.grad(spec.loss(layout(solve(x))), x)
        return g.numpy()

    def forward(params):
        with torch.no_grad():
            return jax.tree_util.tree_map(lambda y: y.numpy(), layout(solve(torch.tensor(np.asarray(params)))))

    return PeerRun(grad, forward, lambda out: out)  # torch on the CPU returns finished results


# -- gradsolve ------------------------------------------------------------------------------------


class _GradsolveProblem(NamedTuple):
    """The duck-typed problem gradsolve reads: name, dim, t0, t1, is_stiff, f_jax(t, y, p)."""

    name: str
    dim: int
    t0: float
    t1: float
    f_jax: Callable
    is_stiff: bool = False


def _gradsolve(peer, spec: Spec) -> PeerRun:
    # Importing gradsolve switches JAX to float64 unless told otherwise: keep this process's
    # setting, so every other row keeps its precision.
    os.environ["GRADSOLVE_X64"] = "1" if jax.config.jax_enable_x64 else "0"
    with warnings.catch_warnings():  # its float64 constants, truncated under float32: not ours
        warnings.simplefilter("ignore", UserWarning)
        from gradsolve.solvers.fixed_step_tsit5 import solve_jax, solve_jax_saveat

    lorenz = spec.workload == "lorenz"
    if lorenz:
        def f_jax(t, y, p):
            return jnp.stack(problems.lorenz_field(t, (y[0], y[1], y[2]), p[0]))
    else:
        field = problems.PROBLEMS[spec.workload].field

        def f_jax(t, y, p):
            return field(t, y, None)

    y0 = jnp.stack(jax.tree_util.tree_leaves(spec.y0), axis=-1)
    t1 = float(np.asarray(spec.ts)[-1]) if lorenz else spec.t1
    problem = _GradsolveProblem(spec.workload, y0.shape[1], spec.t0, t1, f_jax)
    n_steps = int(round((t1 - spec.t0) / spec.dt0))

    def solve(params):
        if lorenz:
            _, ys = solve_jax_saveat(problem, y0, params[:, None], jnp.asarray(spec.ts), n_steps=n_steps)
            return tuple(ys[..., i] for i in range(ys.shape[-1]))
        return solve_jax(problem, params[:, None], jnp.zeros_like(params)[:, None], n_steps=n_steps)[:, 0]

    return PeerRun(jax.jit(jax.grad(lambda params: spec.loss(solve(params)))), jax.jit(solve), jax.block_until_ready)
