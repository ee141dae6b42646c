"""One script for a GPU machine: kernel correctness compiled on the GPU, then the reference timings.

    PYTHONUNBUFFERED=1 python bench/gpu_check.py [--out DIR] [--quick]

(a) Compiled Pallas kernels against the jax backend on the same device: float32 and float64,
    fixed and adaptive steps, save times, gradients for y0 and per-lane and shared args.
(b) jit(grad) timings (median of repeats, compile timed separately), each beside a check of the
    gradient against the jax backend or diffrax: the seed workload (80,000 fixed steps x 2,250
    lanes), its state-dependent variant, and a Lorenz ensemble (B = 65,536, 1,000 fixed steps;
    and adaptive). diffrax's RecursiveCheckpointAdjoint runs on a horizon 1/100 as long and is
    extrapolated per step, as the table says. Sized for under 4 minutes on an H100.
Prints a compact table last and writes it (with the log) under --out when given.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import fusedrk
from fusedrk import problems
from fusedrk._measure import rel_err, timed
from fusedrk._solve import tape_bytes

ROWS = []
INTERPRET = False  # --interpret: run the kernels in interpret mode (a CPU smoke run of this script)


def solve(*args, backend, **kw):
    return fusedrk.solve(*args, backend=backend, interpret=INTERPRET and backend == "pallas", **kw)


def log(msg: str) -> None:
    print(msg, flush=True)


def correctness() -> bool:
    ok = True
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.float64, 1e-12)):
        with jax.enable_x64(dtype == jnp.float64):
            for adaptive in (False, True):
                p = problems.VDP
                y0, mu = p.make(1000, dtype)
                kw = dict(args=mu, args_axes=0, dt0=p.dt0, ts=jnp.linspace(0.0, 3.0, 7), max_steps=2048)
                if adaptive:
                    kw.update(rtol=1e-6, atol=1e-6)

                def loss(backend, y0, mu):
                    sol = solve(p.field, y0, 0.0, 3.0, backend=backend, **dict(kw, args=mu))
                    return jnp.sum(sol.ys["x"] ** 2) + jnp.sum(jnp.sin(sol.ys["v"]))

                sols = {b: solve(p.field, y0, 0.0, 3.0, backend=b, **kw) for b in ("pallas", "jax")}
                grads = {b: jax.jit(jax.grad(lambda y, m, b=b: loss(b, y, m), argnums=(0, 1)))(y0, mu)
                         for b in ("pallas", "jax")}
                steps_equal = bool(np.array_equal(sols["pallas"].stats["num_steps"], sols["jax"].stats["num_steps"]))
                e_ys, e_grad = rel_err(sols["pallas"].ys, sols["jax"].ys), rel_err(grads["pallas"], grads["jax"])
                good = steps_equal and e_ys <= tol and e_grad <= 100 * tol
                ok &= good
                log(f"check {jnp.dtype(dtype).name} {'adaptive' if adaptive else 'fixed'}: ys rel err {e_ys:.1e}, "
                    f"grad rel err {e_grad:.1e}, equal steps {steps_equal} -> {'ok' if good else 'FAILED'}")
    return ok


def bench_seed(name: str, quick: bool) -> None:
    p = problems.PROBLEMS[name]
    t1 = 20.0 if quick else p.t1
    steps = int(round(t1 / p.dt0))
    y0, _ = p.make(2250, jnp.float32)

    def loss(backend, y0, t_end, max_steps):
        return jnp.sum(solve(p.field, y0, 0.0, t_end, dt0=p.dt0, backend=backend, max_steps=max_steps).ys)

    grad, c, _, run, _ = timed(jax.jit(jax.grad(lambda y: loss("pallas", y, t1, steps + 1))), y0)
    short = max(steps // 100, 10)
    check = jax.jit(jax.grad(lambda y: loss("jax", y, short * p.dt0, short + 1)))(y0)
    mine = jax.jit(jax.grad(lambda y: loss("pallas", y, short * p.dt0, short + 1)))(y0)
    dfx_ms = diffrax_per_step_ms(p, y0, short) * steps
    record(name, f"{steps} steps x 2250", run, c, rel_err(mine, check), dfx_ms, tape_bytes(steps + 1, (y0,), 4))


def diffrax_per_step_ms(p, y0, steps) -> float:
    import diffrax

    def loss(y0):
        sol = diffrax.diffeqsolve(diffrax.ODETerm(p.field), diffrax.Tsit5(), 0.0, steps * p.dt0, p.dt0, y0,
                                  max_steps=steps + 1)
        return jnp.sum(sol.ys)

    run = timed(jax.jit(jax.grad(loss)), y0, repeats=2).median_s
    return run * 1e3 / steps


def bench_lorenz(adaptive: bool, quick: bool) -> None:
    p = problems.LORENZ
    B = 256 if quick else 65536
    y0, rho = p.make(B, jnp.float32)
    ts = jnp.linspace(0.1, 1.0, 10)
    kw = dict(dt0=p.dt0, ts=ts, max_steps=1001)
    if adaptive:
        kw.update(rtol=1e-6, atol=1e-6, max_steps=1024)

    def loss(backend, rho):
        sol = solve(p.field, y0, 0.0, 1.0, args=rho, args_axes=0, backend=backend, **kw)
        return jnp.mean(sol.ys[2] ** 2)

    grad, c, _, run, _ = timed(jax.jit(jax.grad(lambda r: loss("pallas", r))), rho)
    check = jax.jit(jax.grad(lambda r: loss("jax", r)))(rho)
    run_fwd = timed(jax.jit(lambda r: solve(p.field, y0, 0.0, 1.0, args=r, args_axes=0,
                                                      backend="pallas", **kw).ys), rho).median_s
    name = "lorenz-adaptive" if adaptive else "lorenz"
    record(name, f"B={B}", run, c, rel_err(grad, check), None, None, forward_ms=run_fwd * 1e3)


def record(name, size, run_s, compile_s, err, diffrax_ms, tape_size, forward_ms=None):
    row = dict(workload=name, size=size, grad_ms=run_s * 1e3, compile_s=compile_s, grad_rel_err=err,
               diffrax_rca_ms=diffrax_ms, tape_gbps=(2 * tape_size / run_s / 1e9) if tape_size else None,
               forward_ms=forward_ms)
    ROWS.append(row)
    log(f"{name:16s} {size:22s} jit(grad) {row['grad_ms']:9.2f} ms (compile {compile_s:.1f} s) "
        f"grad rel err vs jax backend {err:.1e}"
        + (f", diffrax RCA ~{diffrax_ms:.0f} ms (extrapolated)" if diffrax_ms else "")
        + (f", forward {forward_ms:.2f} ms" if forward_ms else ""))


def _fmt(x, spec=".2f"):
    return "" if x is None else format(x, spec)


def table() -> str:
    lines = ["| workload | size | jit(grad) ms | forward ms | diffrax RCA ms | speed-up | tape GB/s | grad rel err |",
             "|---|---|---|---|---|---|---|---|"]
    for r in ROWS:
        speed = f"{r['diffrax_rca_ms'] / r['grad_ms']:.0f}x" if r["diffrax_rca_ms"] else ""
        lines.append(
            f"| {r['workload']} | {r['size']} | {r['grad_ms']:.2f} | {_fmt(r['forward_ms'])} | "
            f"{_fmt(r['diffrax_rca_ms'], '.0f')} | {speed} | {_fmt(r['tape_gbps'], '.0f')} | {r['grad_rel_err']:.1e} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--quick", action="store_true", help="small sizes (for a smoke run)")
    parser.add_argument("--interpret", action="store_true", help="kernels in interpret mode (CPU smoke run)")
    opts = parser.parse_args()
    global INTERPRET
    INTERPRET = opts.interpret
    log(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    ok = correctness()
    for name in ("seed", "seed-nl"):
        bench_seed(name, opts.quick)
    for adaptive in (False, True):
        bench_lorenz(adaptive, opts.quick)
    text = table()
    log(text)
    if opts.out:
        os.makedirs(opts.out, exist_ok=True)
        with open(os.path.join(opts.out, "gpu_check.md"), "w") as fh:
            fh.write(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}\n\n{text}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
