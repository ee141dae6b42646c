"""Sharded solves against the unsharded one, on 4 host devices (run by tests/test_sharding.py
in a subprocess, so that the rest of the suite keeps one device).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharded_check.py [--quick] [--part P]

``--quick``: B = 4 and 7 only (the full run adds B = 1,000 for both backends). ``--part``: only
the jax backend's cases on the Explicit mesh, the kernels', or the rest (Auto mesh, one-device
mesh, replays, eager call and a failing lane), so the suite can run the parts side by side.

For each backend ("jax"; "pallas" in interpret mode), fixed and adaptive steps and B lanes:
values, step counts, result codes and gradients (per-lane and shared arguments, and y0) of a
batch sharded over the 4 devices equal the unsharded solve to F64_TOL, outputs come back
sharded like the input, and no collective runs inside a time loop of the compiled HLO.
Exit status 1 on any mismatch, with what differed.
"""

from __future__ import annotations

import os
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import fusedrk  # noqa: E402

F64_TOL = 1e-12  # as tests/conftest.py
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def field(t, y, a):
    # A [2] state per lane, a per-lane rate and a shared forcing amplitude.
    x, v = y[0], y[1]
    return jnp.stack([v, -a["k"] * x - 0.3 * v + a["c"] * jnp.cos(t)])


def problem(B):
    rng = np.random.default_rng(B)
    y0 = jnp.asarray(rng.uniform(0.5, 1.5, (B, 2)))
    args = {"k": jnp.asarray(rng.uniform(1.0, 4.0, B)), "c": jnp.asarray(0.7)}
    return y0, args


def run(backend, adaptive, y0, args, sharding=None, **extra):
    step = dict(rtol=1e-7, atol=1e-7, dt0=0.05) if adaptive else dict(dt0=0.2)

    def loss(y0, args):
        sol = fusedrk.solve(field, y0, 0.0, 2.0, args=args, args_axes={"k": 0, "c": None},
                            ts=jnp.linspace(0.0, 2.0, 4), backend=backend, interpret=backend == "pallas",
                            sharding=sharding, **step, **extra)
        return jnp.sum(jnp.sin(sol.ys)), (sol.ys, sol.stats["num_steps"], sol.result, sol.t_final)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def loop_bodies(hlo: str) -> set:
    """Names of the computations a while loop runs, with everything they call."""
    calls, bodies = {}, set()
    name = None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m:
            name = m.group(1)
            calls[name] = set()
        elif name is not None:
            keys = "to_apply|body|condition|calls|true_computation|false_computation"
            calls[name].update(re.findall(rf"(?:{keys})=%?([\w.\-]+)", line))
            for group in re.findall(r"(?:branch_computations|called_computations|calls)=\{([^}]*)\}", line):
                calls[name].update(re.findall(r"%?([\w.\-]+)", group))
            bodies.update(re.findall(r"body=%?([\w.\-]+)", line))
            bodies.update(re.findall(r"condition=%?([\w.\-]+)", line))
    seen, todo = set(), list(bodies)
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.add(c)
            todo.extend(calls.get(c, ()))
    return seen


def collectives_in_loops(hlo: str) -> list:
    inside = loop_bodies(hlo)
    found, name = [], None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m:
            name = m.group(1)
        elif name in inside:
            found += [f"{name}: {op}" for op in COLLECTIVES if f" {op}(" in line or f" {op}-start(" in line]
    return found


def checker_sees_a_collective_in_a_loop(mesh) -> bool:
    """The HLO check must be able to fail: a psum inside a while loop is found."""

    def per_device(x):
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (jax.lax.psum(c[0], "lanes"), c[1] + 1), (x, 0))[0]

    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=PartitionSpec("lanes"),
                               out_specs=PartitionSpec("lanes"), check_vma=False))
    x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, PartitionSpec("lanes")))
    return bool(collectives_in_loops(fn.lower(x).compile().as_text()))


def check(backend, adaptive, B, mesh, **extra) -> list:
    y0, args = problem(B)
    lanes = NamedSharding(mesh, PartitionSpec("lanes"))
    shared = NamedSharding(mesh, PartitionSpec())
    fn = run(backend, adaptive, y0, args, **extra)
    (value, (ys, steps, result, t_final)), grads = fn(y0, args)
    explicit = mesh.axis_types[0] == jax.sharding.AxisType.Explicit
    if B % mesh.size == 0:  # the user's batch arrives sharded
        y0_in = jax.device_put(y0, lanes)
        args_in = {"k": jax.device_put(args["k"], lanes), "c": jax.device_put(args["c"], shared)}
    else:  # a batch that does not divide: unsharded input, the sharding passed explicitly
        y0_in, args_in = y0, args
    # Under jit, solve reads the batch sharding from y0's type on a mesh with Explicit axes;
    # with Auto axes (or an unsharded y0) it must be told.
    told = None if explicit and B % mesh.size == 0 else lanes
    sharded = run(backend, adaptive, y0, args, sharding=told, **extra)
    (s_value, (s_ys, s_steps, s_result, s_t_final)), s_grads = sharded(y0_in, args_in)
    case = (f"{backend} {'adaptive' if adaptive else 'fixed'} B={B} ({'Explicit' if explicit else 'Auto'} mesh of "
            f"{mesh.size}){' ' + str(extra) if extra else ''}")
    bad = []

    def close(what, a, b):
        a, b = np.asarray(a), np.asarray(b)
        scale = max(float(np.max(np.abs(b))), 1e-300)
        err = float(np.max(np.abs(a - b))) / scale
        if not err <= F64_TOL:
            bad.append(f"{case}: {what} differs by {err:.1e} (relative to its largest entry)")

    close("ys", s_ys, ys)
    close("t_final", s_t_final, t_final)
    close("loss", s_value, value)
    close("d loss / d y0", s_grads[0], grads[0])
    close("d loss / d k (per lane)", s_grads[1]["k"], grads[1]["k"])
    close("d loss / d c (shared)", s_grads[1]["c"], grads[1]["c"])
    if not np.array_equal(np.asarray(s_steps), np.asarray(steps)):
        bad.append(f"{case}: step counts differ: {np.asarray(s_steps)} vs {np.asarray(steps)}")
    if not np.array_equal(np.asarray(s_result), np.asarray(result)):
        bad.append(f"{case}: result codes differ")
    if B % mesh.size == 0 and tuple(s_ys.sharding.spec)[:1] != ("lanes",):
        bad.append(f"{case}: ys came back with sharding {s_ys.sharding}, not split over the lanes")
    hlo = sharded.lower(y0_in, args_in).compile().as_text()
    inside = collectives_in_loops(hlo)
    if inside:
        bad.append(f"{case}: collectives inside a time loop: {inside[:4]}")
    kinds = {op for op in COLLECTIVES if f" {op}(" in hlo or f" {op}-start(" in hlo}
    if mesh.size > 1 and "all-reduce" not in kinds:
        bad.append(f"{case}: no all-reduce: the shared argument's cotangent was not summed over devices")
    if B % mesh.size == 0 and kinds - {"all-reduce"}:  # nothing gathered (the throw check included)
        bad.append(f"{case}: unexpected collectives {sorted(kinds)}")
    print(f"{case}: {'ok' if not bad else 'FAILED'} (steps {int(np.max(np.asarray(steps)))})", flush=True)
    return bad


def eager_and_failing(mesh) -> list:
    """An unjitted sharded call equals the unsharded one; a failing lane raises from a sharded
    jit(grad) taken with respect to the arguments only."""
    bad = []
    y0, args = problem(8)
    lanes = NamedSharding(mesh, PartitionSpec("lanes"))
    kw = dict(args_axes={"k": 0, "c": None}, dt0=0.2)
    eager = fusedrk.solve(field, jax.device_put(y0, lanes), 0.0, 2.0, args=args, **kw)
    plain = fusedrk.solve(field, y0, 0.0, 2.0, args=args, **kw)
    err = float(np.max(np.abs(np.asarray(eager.ys) - np.asarray(plain.ys))) / np.max(np.abs(np.asarray(plain.ys))))
    if not err <= F64_TOL:
        bad.append(f"eager sharded call: ys differ from the unsharded solve by {err:.1e}")
    failing = dict(args, k=args["k"].at[5].set(jnp.nan))

    def loss(args):
        return jnp.sum(fusedrk.solve(field, jax.device_put(y0, lanes), 0.0, 2.0, args=args, max_steps=3, **kw).ys)

    try:
        jax.block_until_ready(jax.jit(jax.grad(loss))(failing))
        bad.append("a failing lane gave a gradient without an error (sharded jit(grad) w.r.t. args)")
    except (jax.errors.JaxRuntimeError, RuntimeError) as e:
        if "fusedrk.solve: a lane failed" not in str(e):
            bad.append(f"a failing lane raised something else: {str(e)[:200]}")
    print(f"eager call and failing lane: {'ok' if not bad else 'FAILED'}", flush=True)
    return bad


PARTS = ("jax", "pallas", "rest")


def main(quick: bool, parts=PARTS) -> int:
    jax.config.update("jax_enable_x64", True)
    if len(jax.devices()) < 4:
        print(f"needs 4 devices, found {jax.devices()}")
        return 2
    mesh = jax.make_mesh((4,), ("lanes",))
    sizes = (4, 7) if quick else (4, 7, 1000)
    cases = [(backend, a, B) for backend in ("jax", "pallas") if backend in parts for a in (False, True)
             for B in sizes]
    bad = [] if checker_sees_a_collective_in_a_loop(mesh) else ["the HLO check misses a psum inside a loop"]
    for case in cases:
        bad += check(*case, mesh)
    if "rest" in parts:
        auto = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("lanes",),
                                 axis_types=(jax.sharding.AxisType.Auto,))
        for B in (8, 7):
            bad += check("jax", True, B, auto)
        # One device of an Explicit mesh: the lanes' type names the mesh axis all the same.
        bad += check("jax", True, 7, jax.make_mesh((1,), ("lanes",), devices=jax.devices()[:1]))
        # A ring smaller than the solve: each device replays from its own checkpoints.
        bad += check("jax", True, 8, mesh, tape_rows=3)
        bad += eager_and_failing(mesh)
    print("\n".join(bad) if bad else "all sharded solves equal the unsharded ones")
    return 1 if bad else 0


if __name__ == "__main__":
    part = sys.argv[sys.argv.index("--part") + 1] if "--part" in sys.argv else None
    if part is not None and part not in PARTS:
        sys.exit(f"--part must be one of {PARTS}, not {part!r}")
    sys.exit(main("--quick" in sys.argv, PARTS if part is None else (part,)))
