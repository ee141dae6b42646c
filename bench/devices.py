"""Lanes per second of a sharded gradient against the device count.

    python -m bench.devices [--devices 1 2 4] [--batch 16384] [--backend jax] [--repeats 5]

Each count runs in a subprocess with that many devices (on a CPU: host devices from
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, which share the machine's cores, so the
curve there is informational; on a machine with N GPUs it is the scaling curve). The workload
is the README's Lorenz example (adaptive, rtol = atol = 1e-6, a [3] state per lane) with its
batch split over all devices, ``jit(value_and_grad)`` of the mean of z(t1)^2 with respect to
the per-lane rho. Every row prints the gradient's largest relative difference from the
first row's beside its time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np

CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import fusedrk
B, backend, repeats = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def lorenz(t, y, rho):
    x, u, z = y[0], y[1], y[2]
    return jnp.stack([10.0 * (u - x), x * (rho - z) - u, x * u - 8.0 / 3.0 * z])

mesh = jax.make_mesh((jax.device_count(),), ("lanes",))
lanes = NamedSharding(mesh, P("lanes"))
y0 = jax.device_put(jnp.tile(jnp.asarray([1.0, 0.0, 0.0]), (B, 1)), lanes)
rho = jax.device_put(jnp.linspace(20.0, 30.0, B), lanes)

def loss(rho):
    sol = fusedrk.solve(lorenz, y0, 0.0, 1.0, args=rho, args_axes=0, dt0=0.01, rtol=1e-6, atol=1e-6,
                        backend=backend)
    return jnp.mean(sol.ys[:, -1, 2] ** 2)

fn = jax.jit(jax.value_and_grad(loss))
value, grad = jax.block_until_ready(fn(rho))
times = []
for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(rho))
    times.append(time.perf_counter() - start)
print("RESULT " + json.dumps(dict(devices=jax.device_count(), device=str(jax.devices()[0].device_kind),
                                  median_s=float(np.median(times)), grad=np.asarray(grad).tolist())))
"""


def platform() -> str:
    """The default JAX platform, asked of a child process (a GPU parent would hold memory)."""
    done = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                          capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else "cpu"


def run(devices: int, B: int, backend: str, repeats: int, on: str) -> dict:
    env = dict(os.environ)
    if on == "cpu":  # host devices sharing the machine's cores
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    else:  # the first `devices` of the GPUs this process may use
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(devices)]
        if len(ids) < devices:
            raise RuntimeError(f"{devices} devices asked for, CUDA_VISIBLE_DEVICES={visible}")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:devices])
    done = subprocess.run([sys.executable, "-c", CHILD, str(B), backend, str(repeats)], env=env,
                          capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{devices} devices failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.devices", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4], help="device counts to time")
    parser.add_argument("--batch", type=int, default=16384, help="lanes B, split over the devices")
    parser.add_argument("--backend", default="jax", choices=["jax", "pallas", "auto"], help="fusedrk backend")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per device count (median)")
    opts = parser.parse_args()
    on = platform()
    B = opts.batch - opts.batch % math.lcm(*opts.devices)  # every count splits the batch evenly
    rows = [run(n, B, opts.backend, opts.repeats, on) for n in opts.devices]
    base = np.asarray(rows[0]["grad"])
    print(f"\n{rows[0]['device']}, B = {B}, backend {opts.backend}, jit(value_and_grad) of the README "
          "Lorenz loss\n")
    print(f"| devices | median ms | lanes/s | grad rel. diff. vs {opts.devices[0]} device(s) |")
    print("|---|---|---|---|")
    for r in rows:
        diff = float(np.max(np.abs(np.asarray(r["grad"]) - base)) / np.max(np.abs(base)))
        print(f"| {r['devices']} | {r['median_s'] * 1e3:.1f} | {B / r['median_s']:,.0f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
