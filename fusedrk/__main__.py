"""Demonstration: ``python -m fusedrk``.

Solves and differentiates a batch of Van der Pol oscillators, one damping parameter per lane,
with adaptive Tsit5 in float64 on the default device; checks values, step counts and
gradients against ``jax.vmap(diffrax.diffeqsolve)`` when diffrax is installed, and times
both. Sized to finish in well under a minute on two CPU cores; ``--quick`` (CI) is smaller.
Exit status 1 when the agreement check fails: step counts differ, or values or gradients
differ by more than AGREEMENT (the project's float64 promise).
"""

from __future__ import annotations

import argparse
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fusedrk  # noqa: E402
from fusedrk import problems  # noqa: E402
from fusedrk._measure import rel_err, timed  # noqa: E402

AGREEMENT = 1e-10


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedrk", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="number of ODEs (lanes)")
    parser.add_argument("--quick", action="store_true", help="32 lanes, one timed repeat, one diffrax adjoint")
    parser.add_argument("--agreement", type=float, default=AGREEMENT,
                        help="largest relative error of values and gradients that passes the check")
    parser.add_argument("--max-steps", type=int, default=4096,
                        help="step limit per lane (the gradient tape is a ring sized by the work, not by this)")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.batch = 32
    # Each timed call is a few to a few hundred ms; 3 repeats gave speed-ups from 4.2x to 12.0x
    # over four runs on 2 cores. 15 repeats within a 3 s budget per call, and the spread printed.
    repeats, budget = (1, None) if opts.quick else (15, 3.0)

    def timing(fn):
        t = timed(fn, mu, repeats=repeats, budget_s=budget)
        return t.out, t.compile_s, t

    def spread(t) -> str:
        return f"{t.median_s * 1e3:9.2f} ms   (p20-p80 {t.p20_s * 1e3:.2f}-{t.p80_s * 1e3:.2f})"

    def faster(theirs, ours) -> str:
        return (f"fusedrk {theirs.median_s / ours.median_s:.1f}x faster "
                f"(p20-p80 range {theirs.p20_s / ours.p80_s:.1f}-{theirs.p80_s / ours.p20_s:.1f}x)")

    p = problems.VDP
    y0, mu = p.make(opts.batch, jnp.float64)
    ts = jnp.linspace(p.t0, p.t1, 25)
    settings = dict(dt0=p.dt0, rtol=1e-8, atol=1e-8, ts=ts, max_steps=opts.max_steps)

    def loss(sol_ys):
        return jnp.mean((sol_ys["x"] - jnp.cos(ts)) ** 2)

    def ours(mu):
        return fusedrk.solve(p.field, y0, p.t0, p.t1, args=mu, args_axes=0, **settings)

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"problem: {opts.batch} Van der Pol oscillators, per-lane mu in [0.5, 3], t in [0, 6], "
          "adaptive Tsit5 (rtol = atol = 1e-8), 25 save times, float64")
    sol, c_fwd, t_fwd = timing(jax.jit(ours))
    grad, c_grad, t_grad = timing(jax.jit(jax.grad(lambda m: loss(ours(m).ys))))
    steps = np.asarray(sol.stats["num_steps"])
    print(f"fusedrk  forward    {spread(t_fwd)}, compile {c_fwd:.1f} s; steps per lane "
          f"{steps.min()}..{steps.max()}, rejected {int(np.sum(sol.stats['num_rejected_steps']))}")
    print(f"fusedrk  jit(grad)  {spread(t_grad)}, compile {c_grad:.1f} s")

    try:
        import diffrax
    except ImportError:
        print("diffrax is not installed: no comparison (pip install diffrax)")
        return 0

    def oracle(mu, adjoint):
        def one(y0_lane, mu_lane):
            return diffrax.diffeqsolve(
                diffrax.ODETerm(p.field), diffrax.Tsit5(), p.t0, p.t1, p.dt0, y0_lane, mu_lane,
                saveat=diffrax.SaveAt(ts=ts), adjoint=adjoint,
                stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
            )

        return jax.vmap(one)(y0, mu)

    adjoint = diffrax.RecursiveCheckpointAdjoint()
    ref, _, t_ref_fwd = timing(jax.jit(lambda m: oracle(m, adjoint)))
    same_steps = bool(np.array_equal(sol.stats["num_steps"], ref.stats["num_steps"]))
    errors = [rel_err(sol.ys, ref.ys)]
    print(f"agreement with jax.vmap(diffrax.diffeqsolve): ys max rel err {errors[0]:.1e}, "
          f"equal step counts per lane: {same_steps}")
    adjoints = [diffrax.RecursiveCheckpointAdjoint()] + ([] if opts.quick else [diffrax.DirectAdjoint()])
    for adjoint in adjoints:
        name = type(adjoint).__name__
        ref_grad, _, t_ref = timing(jax.jit(jax.grad(lambda m: loss(oracle(m, adjoint).ys))))
        errors.append(rel_err(grad, ref_grad))
        print(f"diffrax  jit(grad)  {spread(t_ref)}  {name}: gradient max rel err "
              f"{errors[-1]:.1e}, {faster(t_ref, t_grad)}")
    print(f"diffrax  forward    {spread(t_ref_fwd)}  {faster(t_ref_fwd, t_fwd)}")
    if same_steps and max(errors) <= opts.agreement:
        print(f"agreement check passed (equal step counts, errors <= {opts.agreement:g})")
        return 0
    print(f"AGREEMENT CHECK FAILED: equal step counts {same_steps}, largest error {max(errors):.1e} "
          f"(allowed {opts.agreement:g})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
