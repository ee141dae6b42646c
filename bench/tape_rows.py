"""python -m bench.tape_rows: the jit(grad) time of three adaptive solves against tape_rows.

The measurement behind the automatic ring size of the jax backend (fusedrk/_solve.py
``JAX_TAPE_BYTES``): on a CPU its ring is left uninitialised, so unused rows cost no time, but
a gradient whose scratch memory passes glibc's 32 MiB mmap ceiling faults in every page it
writes, on every call, while a replayed iteration costs one forward step. Each row also prints the
iterations replayed and the gradient's largest relative difference from the zero-replay one
(the schedule must not change it).

    python -m bench.tape_rows            # CPU: a few minutes
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import fusedrk
from fusedrk import problems
from fusedrk._measure import rel_err, timed


def mlp(t, y, w):
    return jnp.tanh(y @ w["a"]) @ w["b"]


def workloads():
    """name -> (field, y0, params, t1, params_axes, state floats per lane)."""
    B = 4096
    lor = (problems.lorenz_field, (jnp.ones(B), jnp.zeros(B), jnp.zeros(B)), jnp.linspace(20.0, 30.0, B), 0)
    key = jax.random.PRNGKey(0)
    w = {"a": jax.random.normal(key, (4, 32)) / 2, "b": jax.random.normal(jax.random.split(key)[0], (32, 4)) / 6}
    node = (mlp, jax.random.normal(key, (256, 4)), w, None)
    return {"readme (B=4096, t1=1)": (*lor, 1.0), "readme, t1=10": (*lor, 10.0), "neural ODE (B=256)": (*node, 1.0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tape_rows", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64, 128, 256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| workload | iterations | tape_rows | replayed | jit(grad) ms | grad diff |")
    print("|---|---|---|---|---|---|")
    for name, (field, y0, params, axes, t1) in workloads().items():
        def make(R):
            def loss(p):
                sol = fusedrk.solve(field, y0, 0.0, t1, args=p, args_axes=axes, dt0=0.01, rtol=1e-6,
                                    atol=1e-6, ts=jnp.linspace(0.0, t1, 10), tape_rows=R, backend="jax")
                return sum(jnp.mean(y ** 2) for y in jax.tree_util.tree_leaves(sol.ys)), sol.stats

            return jax.jit(jax.grad(loss, has_aux=True))

        ref, stats = make(4096)(params)
        iterations = int(np.max(stats["num_steps"]))
        for R in [None, *opts.rows]:
            fn = make(R)
            (grad, stats), _, _, median, _ = timed(fn, params, repeats=opts.repeats)
            print(f"| {name} | {iterations} | {'auto' if R is None else R} | "
                  f"{int(np.max(stats['num_replayed_iterations']))} | {median * 1e3:.1f} | {rel_err(grad, ref):.0e} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
