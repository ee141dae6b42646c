"""python -m bench.allsave: fusedrk.AllSaveAdjoint against diffrax's adjoints on small and large states.

Van der Pol written as researchers write it, Dopri5, PIDController(rtol=1e-7, atol=1e-9), saved
at 11 times on [0, 10], float64: one oscillator (2 components) and a ring of ten coupled ones
(20 components), each as one solve and under jax.vmap over 64 initial states. The large state,
the seed's 2,250 components at 8,000 fixed steps, is ``python bench/seed.py``.

Each row: the median of the repeats of jit(value_and_grad) (p20 to p80 beside it), the steps
taken, and the gradient's largest relative difference from DirectAdjoint's, which
differentiates the same program without recomputing anything (the oracle with adaptive
steps: RecursiveCheckpointAdjoint departs from it by ~1e-9 here, see tests/test_allsave.py).
AllSaveAdjoint runs twice: with its default (``store="auto"``: under jax.vmap on a CPU it
stores each step's inputs, otherwise its residuals) and with ``store="residuals"``; the bytes
it stores per step (per lane under vmap) are printed beside its rows. A last table times
AllSaveAdjoint() and RecursiveCheckpointAdjoint(checkpoints=max_steps) alternately, call after
call in one process (``--alternate`` pairs), the fairest comparison on a machine whose speed
drifts.

    python -m bench.allsave                  # ~3 minutes on 2 CPU cores
    python -m bench.allsave --max-steps 256  # storage sized nearer the ~170 steps taken
"""

from __future__ import annotations

import argparse
import time

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

import fusedrk
from fusedrk._measure import rel_err, timed


def van_der_pol(t, y, mu):
    return jnp.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


def van_der_pol_ring(t, y, mu):
    """Ten oscillators, each pulled towards its two neighbours: 20 components."""
    x, v = y[0::2], y[1::2]
    coupling = 0.1 * (jnp.roll(x, 1) - 2 * x + jnp.roll(x, -1))
    return jnp.stack([v, mu * (1 - x**2) * v - x + coupling], axis=1).reshape(-1)


ADJOINTS = {
    "RecursiveCheckpointAdjoint(checkpoints=max_steps)": lambda m: diffrax.RecursiveCheckpointAdjoint(checkpoints=m),
    "RecursiveCheckpointAdjoint()": lambda m: diffrax.RecursiveCheckpointAdjoint(),
    "DirectAdjoint()": lambda m: diffrax.DirectAdjoint(),
    "fusedrk.AllSaveAdjoint()": lambda m: fusedrk.AllSaveAdjoint(),
    "fusedrk.AllSaveAdjoint(store='residuals')": lambda m: fusedrk.AllSaveAdjoint(store="residuals"),
}
RCP_FULL = "RecursiveCheckpointAdjoint(checkpoints=max_steps)"


def cases():
    key = jax.random.PRNGKey(0)
    one = jnp.array([2.0, 0.0])
    ring = jnp.tile(one, 10) + 0.1 * jax.random.normal(key, (20,))
    batch = lambda y: y + 0.1 * jax.random.normal(jax.random.split(key)[1], (64,) + y.shape)  # noqa: E731
    return [
        ("2 components", van_der_pol, one, None),
        ("2 components, vmap 64", van_der_pol, batch(one), 64),
        ("20 components", van_der_pol_ring, ring, None),
        ("20 components, vmap 64", van_der_pol_ring, batch(ring), 64),
    ]


def solve_kwargs(max_steps):
    return dict(stepsize_controller=diffrax.PIDController(rtol=1e-7, atol=1e-9),
                saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 10.0, 11)), max_steps=max_steps)


def stored_bytes(field, y0, mu, store, max_steps, batch) -> int:
    """Bytes AllSaveAdjoint(store=store) stores per step (per lane under vmap)."""
    lane = (y0[0], mu[0]) if batch else (y0, mu)
    return fusedrk.AllSaveAdjoint.bytes_per_step(diffrax.ODETerm(field), diffrax.Dopri5(), 0.0, 10.0, 0.01, *lane,
                                                 store=store, vmapped=bool(batch), **solve_kwargs(max_steps))


def loss_fn(field, adjoint, max_steps, batch):
    def one(y0, mu):
        sol = diffrax.diffeqsolve(diffrax.ODETerm(field), diffrax.Dopri5(), 0.0, 10.0, 0.01, y0, mu,
                                  adjoint=adjoint, **solve_kwargs(max_steps))
        return jnp.sum(sol.ys**2), sol.stats["num_steps"]

    def loss(y0, mu):
        if batch is None:
            return one(y0, mu)
        value, steps = jax.vmap(one)(y0, mu)
        return jnp.sum(value), jnp.max(steps)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.allsave", description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=4096, help="diffeqsolve's max_steps (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per row (default: %(default)s)")
    parser.add_argument("--alternate", type=int, default=25,
                        help="pairs of alternating calls in the last table, 0 to skip it (default: %(default)s)")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, diffrax {diffrax.__version__}, "
          f"max_steps={args.max_steps}")
    print("| problem | adjoint | ms per gradient (p20-p80) | bytes per step | steps | vs DirectAdjoint |")
    print("|---|---|---|---|---|---|")
    for name, field, y0, batch in cases():
        mu = jnp.ones(batch) if batch else jnp.asarray(1.0)
        results = {}
        for label, make in ADJOINTS.items():
            t = timed(loss_fn(field, make(args.max_steps), args.max_steps, batch), y0, mu, repeats=args.repeats)
            results[label] = t
        (_, ref_steps), ref = results["DirectAdjoint()"].out
        for label, t in results.items():
            (_, steps), grads = t.out
            check = "ok" if int(steps) == int(ref_steps) else f"steps differ ({int(ref_steps)})"
            stored = ""
            if label.startswith("fusedrk"):
                stored = stored_bytes(field, y0, mu, "residuals" if "residuals" in label else "auto",
                                      args.max_steps, batch)
            print(f"| {name} | {label} | {1e3 * t.median_s:.2f} ({1e3 * t.p20_s:.2f}-{1e3 * t.p80_s:.2f}) | "
                  f"{stored} | {int(steps)} | {rel_err(grads, ref):.1e} {check} |", flush=True)
    if args.alternate:
        alternate(args)
    return 0


def alternate(args):
    """AllSaveAdjoint() and RecursiveCheckpointAdjoint(checkpoints=max_steps), one call of each
    in turn: medians over the pairs, and their gradients' difference."""
    print(f"\nAlternating, {args.alternate} pairs (ms per gradient, medians):\n")
    print(f"| problem | fusedrk.AllSaveAdjoint() | {RCP_FULL} | ratio | gradients differ by |")
    print("|---|---|---|---|---|")
    for name, field, y0, batch in cases():
        mu = jnp.ones(batch) if batch else jnp.asarray(1.0)
        fns = [loss_fn(field, ADJOINTS[label](args.max_steps), args.max_steps, batch)
               for label in ("fusedrk.AllSaveAdjoint()", RCP_FULL)]
        outs = [jax.block_until_ready(fn(y0, mu)) for fn in fns]
        times = [[], []]
        for _ in range(args.alternate):
            for fn, runs in zip(fns, times):
                start = time.perf_counter()
                jax.block_until_ready(fn(y0, mu))
                runs.append(time.perf_counter() - start)
        ours, theirs = (1e3 * float(np.median(runs)) for runs in times)
        print(f"| {name} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f} | {rel_err(outs[0][1], outs[1][1]):.1e} |",
              flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
