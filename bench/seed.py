"""The seed workload, shortened: jit(grad) of fusedrk's jax backend against diffrax's adjoints.

    python bench/seed.py                 # t1 = 800: 8,000 fixed Tsit5 steps x 2,250 lanes
    python bench/seed.py --field seed-nl # the state-dependent variant
    python bench/seed.py --t1 80 --repeats 3

Each method: compile time separately, then the median of repeats with block_until_ready; every
timing is printed beside the gradient's max relative error against diffrax's
RecursiveCheckpointAdjoint. The diffrax problem is the seed as docs/design.md states it (one ODE
with y in R^2250); fusedrk solves 2,250 one-dimensional lanes, the same arithmetic.
"""

from __future__ import annotations

import argparse

import diffrax
import jax
import jax.numpy as jnp

import fusedrk
from fusedrk import problems
from fusedrk._measure import rel_err, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--field", choices=["seed", "seed-nl"], default="seed")
    parser.add_argument("--t1", type=float, default=800.0)
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()

    p = problems.PROBLEMS[opts.field]
    y0, _ = p.make(2250, jnp.float32)
    steps = int(round((opts.t1 - p.t0) / p.dt0))

    # The seed's gradient decays like exp(-0.1 t): scale the loss so that it is O(1) and the
    # accuracy check below means something in float32 (see problems.seed_loss_scale).
    scale = problems.seed_loss_scale(p.t0, opts.t1) if opts.field == "seed" else 1.0

    def ours(y0):
        return scale * jnp.sum(fusedrk.solve(p.field, y0, p.t0, opts.t1, dt0=p.dt0, max_steps=steps).ys)

    def theirs(adjoint):
        def loss(y0):
            sol = diffrax.diffeqsolve(diffrax.ODETerm(p.field), diffrax.Tsit5(), p.t0, opts.t1, p.dt0, y0,
                                      max_steps=steps, adjoint=adjoint)
            return scale * jnp.sum(sol.ys)

        return loss

    print(f"{opts.field}: {steps} fixed Tsit5 steps x 2250 lanes, float32, jit(grad) of {scale:.3g} * sum(y(t1)) "
          f"w.r.t. y0; device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"diffrax {diffrax.__version__}")
    methods = {
        "diffrax RecursiveCheckpointAdjoint()": theirs(diffrax.RecursiveCheckpointAdjoint()),
        "diffrax RecursiveCheckpointAdjoint(checkpoints=max_steps)":
            theirs(diffrax.RecursiveCheckpointAdjoint(checkpoints=steps)),
        "diffrax DirectAdjoint()": theirs(diffrax.DirectAdjoint()),
        "diffrax + fusedrk.AllSaveAdjoint()": theirs(fusedrk.AllSaveAdjoint()),
        "fusedrk backend=jax": ours,
    }
    reference = None
    results = {}
    for name, loss in methods.items():
        grad, compile_s, _, run_s, _ = timed(jax.jit(jax.grad(loss)), y0, repeats=opts.repeats)
        reference = grad if reference is None else reference
        err = rel_err(grad, reference)
        results[name] = run_s
        print(f"{name:58s} run {run_s * 1e3:9.1f} ms  compile {compile_s:5.1f} s  grad rel err {err:.1e}")
    fastest = min(v for k, v in results.items() if k.startswith("diffrax ") and "fusedrk" not in k)
    print(f"fusedrk vs diffrax's fastest adjoint: {fastest / results['fusedrk backend=jax']:.2f}x")
    allsave = results["diffrax + fusedrk.AllSaveAdjoint()"]
    print(f"AllSaveAdjoint speed-up: {results['diffrax DirectAdjoint()'] / allsave:.2f}x vs DirectAdjoint, "
          f"{results['diffrax RecursiveCheckpointAdjoint(checkpoints=max_steps)'] / allsave:.2f}x vs "
          "RecursiveCheckpointAdjoint(checkpoints=max_steps)")


if __name__ == "__main__":
    main()
