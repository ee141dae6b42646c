"""The one GPU run: compiled kernels checked against the jax backend, then every performance target.

    python3 -m pip install --no-deps --no-build-isolation -e .     # once, on the GPU machine
    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out DIR [--budget-s 480]
    python bench/gpu_check.py --quick --interpret --out DIR        # the same code paths on a CPU

A GPU is lent rarely and for minutes, so one run must deliver everything and survive anything:
each part runs in its own try/except (its traceback goes to the log), every result is appended
to ``DIR/results.jsonl`` the moment it exists and the log to ``DIR/log.txt`` as it goes, and
after ``--budget-s`` seconds the remaining parts are skipped and listed as skipped. Order:

1. Correctness of the compiled kernels against the jax backend on the same device: float32 and
   float64, fixed and adaptive steps, ``ts`` and t1-only, per-lane and shared arguments with
   gradients, B = 1, 7, 129, backward time, a lane hitting max_steps, the seed's 80,000-step
   gradient. float64: equal step counts and values and gradients to 1e-10. float32, fixed
   steps: 10 ulps per step (``fusedrk._measure.rounding_tol``). float32, adaptive: rounding flips
   accept/reject decisions, so the bar is the rounding envelope: the jax backend's own change
   when y0 moves by one ulp, times ``ENVELOPE_MULTIPLE``, plus the fixed-step bound; the
   fraction of lanes with equal step counts is reported.
2. The performance targets, each with PASS/FAIL and its correctness figure beside it.
3. diffrax's fastest adjoint on each target workload (extrapolated where marked).
4. Measurements for open choices (``compare`` rows): the reverse kernel's walk with and
   without its prefetch, and the seeds' gradients at four launch shapes.

Exit status: 0 when every check and target passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
from typing import Callable, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

FLOAT64_TOL = 1e-10


class Sizes(NamedTuple):
    """The workloads' sizes: the targets' at full size, tiny ones for --quick."""

    seed_lanes: int
    seed_t1: float  # dt0 = 0.1: 80,000 steps at full size
    lorenz_lanes: int
    lorenz_steps: int  # of dt0 = 0.001: t in [0, 1] at full size
    forward_lanes: int
    adaptive_lanes: int
    adaptive_t1: float
    copy_floats: int  # the device copy that tape traffic is compared with
    diffrax_seed_steps: int  # diffrax runs this many seed steps, extrapolated to seed_t1
    diffrax_forward_lanes: int  # and this many lanes of the big forward, extrapolated
    big_adaptive_lanes: int  # adaptive Lorenz differentiated with default max_steps and tape_rows


FULL = Sizes(2250, 8000.0, 65536, 1000, 8_388_608, 32768, 1.0, 2**28, 2000, 262144, 262144)
QUICK = Sizes(256, 20.0, 256, 20, 1024, 64, 0.05, 2**20, 200, 1024, 1024)


def _import_fusedrk():
    """fusedrk with its kernels; from the checkout when the project is not pip-installed."""
    import fusedrk

    try:
        importlib.import_module("fusedrk.kernels")
    except ImportError:
        print("fusedrk.kernels is not importable: install the project first with\n"
              "    python3 -m pip install --no-deps --no-build-isolation -e .\n"
              "(loading kernels/ from the checkout for this run)", flush=True)
        spec = importlib.util.spec_from_file_location(
            "fusedrk.kernels", os.path.join(ROOT, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(ROOT, "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["fusedrk.kernels"] = module
        spec.loader.exec_module(module)
        fusedrk.kernels = module
    return fusedrk


fusedrk = _import_fusedrk()
from fusedrk import problems  # noqa: E402
from fusedrk._measure import ENVELOPE_MULTIPLE, one_ulp_up, rel_err, rounding_tol, timed  # noqa: E402
from fusedrk import _liveness  # noqa: E402
from fusedrk._solve import tape_bytes  # noqa: E402


class Run:
    """Options, the output files, the clock and the results of one run."""

    def __init__(self, opts):
        self.quick, self.interpret, self.budget_s = opts.quick, opts.interpret, opts.budget_s
        self.checks = opts.checks
        self.size = QUICK if opts.quick else FULL
        self.start = time.perf_counter()
        self.out = opts.out
        os.makedirs(self.out, exist_ok=True)
        self.log_file = open(os.path.join(self.out, "log.txt"), "w")
        self.results_path = os.path.join(self.out, "results.jsonl")
        open(self.results_path, "w").close()
        self.rows: list = []
        self.cache: dict = {}  # values computed by one part and reused by another

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f} s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def record(self, **row) -> dict:
        row = {"t_s": round(self.elapsed(), 1), **row}
        self.rows.append(row)
        with open(self.results_path, "a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")
        self.log(" ".join(f"{k}={_short(v)}" for k, v in row.items() if k != "t_s"))
        return row

    def solve(self, *args, backend: str, **kw):
        return fusedrk.solve(*args, backend=backend, interpret=self.interpret and backend == "pallas", **kw)


def _short(v):
    return f"{v:.3g}" if isinstance(v, float) else v


# ----------------------------------------------------------------------------- correctness


class Case(NamedTuple):
    name: str
    problem: problems.Problem
    B: int
    dtype: str
    t0: float
    t1: float
    kw: dict  # solve keywords besides args
    quick_t1: float | None = None  # a shorter horizon for --quick


def _weighted_loss(ys):
    # Unequal weights per entry: a swapped or dropped lane changes the gradient.
    return sum(jnp.sum(jnp.sin(x) * (1.0 + jnp.arange(x.size).reshape(x.shape) / x.size))
               for x in jax.tree_util.tree_leaves(ys))


def _seed_loss(t0, t1):
    scale = problems.seed_loss_scale(t0, t1)
    return lambda ys: scale * jnp.sum(ys)


def _seed_workload(run: "Run", name: str):
    """(y0, steps, grad_of) for the seed or seed-nl at the run's size: ``grad_of(backend)`` is a
    fresh jit(grad) of the target's loss (traced anew: a flag the kernels read then applies)."""
    p = problems.PROBLEMS[name]
    t1 = run.size.seed_t1
    steps = int(round(t1 / p.dt0))
    y0, _ = p.make(run.size.seed_lanes, jnp.float32)
    loss_of = _seed_loss(0.0, t1)

    def grad_of(backend):
        return jax.jit(jax.grad(lambda y: loss_of(run.solve(p.field, y, 0.0, t1, dt0=p.dt0, max_steps=steps + 1,
                                                            backend=backend).ys)))

    return y0, steps, grad_of


def correctness_cases(quick: bool) -> list:
    size = QUICK if quick else FULL
    D, V, L, S = problems.DECAY, problems.VDP, problems.LORENZ, problems.SEED
    ts = lambda a, b, n: np.linspace(a, b, n)  # noqa: E731
    cases = [
        Case("f64-fixed-ts", D, 1, "float64", 0.0, 3.0, dict(dt0=0.1, ts=ts(0.0, 3.0, 5))),
        Case("f64-fixed-t1", L, 129, "float64", 0.0, 0.5, dict(dt0=0.01)),
        Case("f64-adaptive-ts", V, 7, "float64", 0.0, 3.0, dict(dt0=0.01, rtol=1e-8, atol=1e-8, ts=ts(0.0, 3.0, 7))),
        Case("f64-adaptive-t1-auto-dt0", D, 129, "float64", 0.0, 3.0, dict(rtol=1e-9, atol=1e-9)),
        Case("f64-backward-adaptive-ts", D, 7, "float64", 3.0, 0.0,
             dict(dt0=-0.1, rtol=1e-7, atol=1e-9, ts=np.asarray([3.0, 1.5, 0.0]))),
        Case("f64-backward-fixed-t1", V, 1, "float64", 2.0, 0.0, dict(dt0=-0.01)),
        Case("f64-max-steps-lane", D, 3, "float64", 0.0, 3.0,
             dict(dt0=0.1, rtol=1e-5, atol=1e-5, max_steps=20, throw=False, ts=np.asarray([0.05, 3.0]))),
        Case("f32-fixed-ts", L, 129, "float32", 0.0, 0.3, dict(dt0=0.001, ts=ts(0.1, 0.3, 4)), quick_t1=0.02),
        Case("f32-fixed-t1", D, 7, "float32", 0.0, 3.0, dict(dt0=0.1)),
        Case("f32-adaptive-ts", V, 129, "float32", 0.0, 3.0, dict(dt0=0.01, rtol=1e-5, atol=1e-5, ts=ts(0.0, 3.0, 7))),
        Case("f32-adaptive-t1", L, 7, "float32", 0.0, 0.5, dict(rtol=1e-5, atol=1e-5)),
        Case("seed-80000-steps", S, size.seed_lanes, "float32", 0.0, size.seed_t1,
             dict(dt0=0.1)),
        # A small tape ring: the reverse kernel re-runs earlier segments from checkpoints (lane
        # tiles that finish at different iterations; rows written, then read).
        Case("f64-ring-7-adaptive-ts", V, 129, "float64", 0.0, 3.0,
             dict(dt0=0.01, rtol=1e-8, atol=1e-8, ts=ts(0.0, 3.0, 7), tape_rows=7), quick_t1=1.0),
        Case("f32-ring-5-fixed-t1", L, 129, "float32", 0.0, 0.5, dict(dt0=0.01, tape_rows=5)),
    ]
    if quick:
        cases = [c._replace(t1=c.quick_t1, kw=dict(c.kw, ts=ts(c.t0, c.quick_t1, 3)) if "ts" in c.kw else c.kw)
                 if c.quick_t1 else c for c in cases]
    return cases


def _args_for(case: Case, args):
    """The max-steps case: two of three lanes too stiff for 20 steps."""
    if case.name == "f64-max-steps-lane":
        return dict(args, k=jnp.asarray([0.1, 50.0, 80.0], args["k"].dtype))
    return args


def _value_and_grad(run: Run, case: Case, backend: str):
    """jit'ed ((loss, solution), gradient) of the case's loss w.r.t. (y0, args)."""
    p = case.problem
    loss_of = _seed_loss(case.t0, case.t1) if p.name == "seed" else _weighted_loss
    kw = dict(case.kw)
    if "rtol" not in kw:  # fixed steps: the steps needed plus one spare row, as a user sets it
        kw["max_steps"] = int(round(abs(case.t1 - case.t0) / abs(kw["dt0"]))) + 1

    def loss(y0, args):
        sol = run.solve(p.field, y0, case.t0, case.t1, args=args, args_axes=p.args_axes, backend=backend, **kw)
        return loss_of(sol.ys), sol

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def check_case(run: Run, case: Case) -> dict:
    with jax.enable_x64(case.dtype == "float64"):
        y0, args = case.problem.make(case.B, jnp.dtype(case.dtype))
        args = _args_for(case, args)
        grad_fn = _value_and_grad(run, case, "pallas")
        ref_fn = _value_and_grad(run, case, "jax")
        (_, ours), g_ours = jax.block_until_ready(grad_fn(y0, args))
        (_, ref), g_ref = jax.block_until_ready(ref_fn(y0, args))
        steps_ours, steps_ref = np.asarray(ours.stats["num_steps"]), np.asarray(ref.stats["num_steps"])
        row = dict(part="check", name=case.name, B=case.B, dtype=case.dtype,
                   steps_max=int(steps_ref.max()), ys_rel_err=rel_err(ours.ys, ref.ys),
                   grad_rel_err=rel_err(g_ours, g_ref),
                   equal_steps_fraction=float(np.mean(steps_ours == steps_ref)),
                   equal_result_codes=bool(np.array_equal(ours.result, ref.result)))
        if case.dtype == "float64":
            tol_ys = tol_grad = FLOAT64_TOL
            ok = row["equal_steps_fraction"] == 1.0
        else:
            tol_ys = tol_grad = rounding_tol(jnp.float32, row["steps_max"])
            ok = True
            if "rtol" in case.kw:  # the rounding envelope of the reference itself
                (_, moved), g_moved = ref_fn(one_ulp_up(y0), args)
                row["envelope_ys"], row["envelope_grad"] = rel_err(moved.ys, ref.ys), rel_err(g_moved, g_ref)
                tol_ys += ENVELOPE_MULTIPLE * row["envelope_ys"]
                tol_grad += ENVELOPE_MULTIPLE * row["envelope_grad"]
            else:
                ok = row["equal_steps_fraction"] == 1.0
        if case.problem.name == "seed":
            run.cache["seed-check"] = (row["ys_rel_err"], row["grad_rel_err"])
        ok &= row["equal_result_codes"] and row["ys_rel_err"] <= tol_ys and row["grad_rel_err"] <= tol_grad
        return run.record(**row, tol_ys=tol_ys, tol_grad=tol_grad, status="PASS" if ok else "FAIL")


# -------------------------------------------------------------------------------- targets


class Target(NamedTuple):
    name: str
    what: str
    limit_ms: float | None  # None: a ratio target (tape traffic)


def _time(run: Run, fn, *args, repeats=5):
    return timed(fn, *args, repeats=repeats, budget_s=10.0)


def _verdict(run: Run, measured, limit, correct: bool, higher_is_better=False):
    if run.quick:
        return "n/a (quick)" if correct else "FAIL"
    met = measured >= limit if higher_is_better else measured <= limit
    return "PASS" if met and correct else "FAIL"


def target_seed(run: Run, name: str) -> None:
    p = problems.PROBLEMS[name]
    B = run.size.seed_lanes
    limit = {"seed": 30.0, "seed-nl": 60.0}[name]
    y0, steps, grad_of = _seed_workload(run, name)
    t = _time(run, grad_of("pallas"), y0)
    if name == "seed" and "seed-check" in run.cache:
        ys_err, grad_err = run.cache["seed-check"]
    else:  # seed-nl: its gradient against the jax backend on the same device, full length
        grad_err = rel_err(t.out, grad_of("jax")(y0))
        ys_err = None
    tol = rounding_tol(jnp.float32, steps)
    correct = grad_err <= tol
    # The seed's VJP reads no state: its tape holds times and flags only (fusedrk/_liveness.py).
    tape = tape_bytes(steps + 1, (y0,), 4, backend="pallas", adaptive=False, interpret=run.interpret,
                      tape_live=_liveness.field_read_components(p.field, y0[0]))
    run.record(part="target", name=name, what=f"{steps} steps x {B} lanes, jit(grad)", ms=t.median_s * 1e3,
               limit_ms=limit, compile_s=t.compile_s, grad_rel_err=grad_err, ys_rel_err=ys_err, tol=tol,
               tape_gb=tape / 1e9, status=_verdict(run, t.median_s * 1e3, limit, correct))


def _lorenz(run: Run, B: int, dtype, *, adaptive: bool):
    p = problems.LORENZ
    y0, rho = p.make(B, dtype)
    steps = run.size.lorenz_steps
    kw = dict(rtol=1e-8, atol=1e-8, dt0=None, max_steps=4096) if adaptive else dict(dt0=p.dt0, max_steps=steps + 1)
    t1 = run.size.adaptive_t1 if adaptive else p.dt0 * steps

    def solve(backend, y, r):
        return run.solve(p.field, y, 0.0, t1, args=r, args_axes=0, backend=backend, **kw)

    def loss(backend, y, r):
        sol = solve(backend, y, r)
        return _weighted_loss(sol.ys), sol

    return y0, rho, t1, kw, solve, loss


def target_lorenz_grad(run: Run) -> None:
    B = run.size.lorenz_lanes
    y0, rho, t1, kw, solve, loss = _lorenz(run, B, jnp.float32, adaptive=False)
    steps = kw["max_steps"] - 1
    fn = jax.jit(jax.grad(lambda y, r: loss("pallas", y, r)[0], argnums=(0, 1)))
    t = _time(run, fn, y0, rho)
    grad_err = rel_err(t.out, jax.jit(jax.grad(lambda y, r: loss("jax", y, r)[0], argnums=(0, 1)))(y0, rho))
    tol = rounding_tol(jnp.float32, steps)
    run.record(part="target", name="lorenz-grad", what=f"{B} lanes x {steps} fixed steps, float32, jit(grad)",
               ms=t.median_s * 1e3, limit_ms=8.0, compile_s=t.compile_s, grad_rel_err=grad_err, tol=tol,
               status=_verdict(run, t.median_s * 1e3, 8.0, grad_err <= tol))


def target_lorenz_vector(run: Run) -> None:
    """Lorenz written with a [B, 3] state (y[0], jnp.stack) against three scalar leaves, the
    same arguments and solve: the kernels make one program of both (bench/README.md, equal
    instruction counts), so the vector form must run within 10% of the tuple form's time."""
    B = run.size.lorenz_lanes
    p = problems.LORENZ
    (x, u, z), rho = p.make(B, jnp.float32)
    args = {"s": jnp.float32(10.0), "r": rho, "b": jnp.float32(8.0 / 3.0)}
    axes = {"s": None, "r": 0, "b": None}
    steps = run.size.lorenz_steps

    def grad_of(field, y0):
        def loss(y, a):
            sol = run.solve(field, y, 0.0, p.dt0 * steps, args=a, args_axes=axes, dt0=p.dt0, max_steps=steps + 1,
                            backend="pallas")
            ys = sol.ys if isinstance(sol.ys, tuple) else tuple(sol.ys[..., j] for j in range(3))
            return _weighted_loss(ys)  # the same weights for both forms

        return _time(run, jax.jit(jax.grad(loss, argnums=(0, 1))), y0, args)

    vector = grad_of(problems.lorenz_vector_field, jnp.stack([x, u, z], axis=1))
    tuple_ = grad_of(problems.lorenz_tuple_field, (x, u, z))
    # The same program: the gradients agree (columns of the [B, 3] cotangent = the leaves').
    grad_err = rel_err((tuple(vector.out[0][:, j] for j in range(3)), vector.out[1]), tuple_.out)
    ratio = vector.median_s / tuple_.median_s
    run.record(part="target", name="lorenz-vector", what=f"{B} lanes x {steps} fixed steps, [B, 3] state / 3 leaves",
               ms=vector.median_s * 1e3, tuple_ms=tuple_.median_s * 1e3, ratio=ratio, limit_ratio=1.1,
               compile_s=vector.compile_s, grad_rel_err=grad_err,
               status=_verdict(run, ratio, 1.1, grad_err <= rounding_tol(jnp.float32, steps)))


def target_lorenz_forward(run: Run) -> None:
    B = run.size.forward_lanes
    checked = min(B, 65536)
    y0, rho, t1, kw, solve, _ = _lorenz(run, B, jnp.float32, adaptive=False)
    steps = kw["max_steps"] - 1
    t = _time(run, jax.jit(lambda y, r: solve("pallas", y, r).ys), y0, rho)
    head = lambda tree: jax.tree_util.tree_map(lambda x: x[:checked], tree)  # noqa: E731
    ref = jax.jit(lambda y, r: solve("jax", y, r).ys)(head(y0), rho[:checked])
    ys_err = rel_err(head(t.out), ref)
    tol = rounding_tol(jnp.float32, steps)
    run.record(part="target", name="lorenz-forward", what=f"{B} lanes x {steps} fixed steps, float32, forward",
               ms=t.median_s * 1e3, limit_ms=40.0, compile_s=t.compile_s, ys_rel_err=ys_err,
               ys_checked_lanes=checked, tol=tol, status=_verdict(run, t.median_s * 1e3, 40.0, ys_err <= tol))


def target_tape_traffic(run: Run) -> None:
    """Tape write rate (tape bytes / (forward with tape - forward without)) against a
    device copy's rate (bytes read + written / time) measured in the same run."""
    B = run.size.lorenz_lanes
    y0, rho, t1, kw, solve, _ = _lorenz(run, B, jnp.float32, adaptive=False)
    steps = kw["max_steps"] - 1

    def ys(r):
        return solve("pallas", y0, r).ys

    plain = _time(run, jax.jit(ys), rho)
    with_tape = _time(run, jax.jit(lambda r: jax.vjp(ys, r)), rho)
    same = rel_err(with_tape.out[0], plain.out)
    n = run.size.copy_floats
    x = jnp.ones((n,), jnp.float32)
    copy = _time(run, jax.jit(lambda v: v + 1.0), x)
    copy_gbps = 2 * 4 * n / copy.median_s / 1e9
    tape = tape_bytes(kw["max_steps"], y0, 4, backend="pallas", adaptive=False, interpret=run.interpret)
    extra_s = max(with_tape.median_s - plain.median_s, 1e-9)
    tape_gbps = tape / extra_s / 1e9
    ratio = tape_gbps / copy_gbps
    run.record(part="target", name="tape-traffic", what=f"Lorenz {B} x {steps}: tape {tape / 1e9:.2f} GB",
               forward_ms=plain.median_s * 1e3, forward_with_tape_ms=with_tape.median_s * 1e3,
               tape_gbps=tape_gbps, copy_gbps=copy_gbps, ratio=ratio, limit_ratio=0.7, ys_rel_err=same,
               status=_verdict(run, ratio, 0.7, same == 0.0, higher_is_better=True))


def target_lorenz_adaptive_f64(run: Run) -> None:
    B = run.size.adaptive_lanes
    with jax.enable_x64(True):
        y0, rho, t1, kw, solve, loss = _lorenz(run, B, jnp.float64, adaptive=True)
        fn = jax.jit(jax.value_and_grad(lambda y, r: loss("pallas", y, r), argnums=(0, 1), has_aux=True))
        t = _time(run, fn, y0, rho)
        (_, ours), g_ours = t.out
        (_, ref), g_ref = jax.jit(jax.value_and_grad(lambda y, r: loss("jax", y, r), argnums=(0, 1), has_aux=True))(y0, rho)
        equal_steps = bool(np.array_equal(ours.stats["num_steps"], ref.stats["num_steps"]))
        grad_err = rel_err(g_ours, g_ref)
        correct = equal_steps and grad_err <= FLOAT64_TOL and rel_err(ours.ys, ref.ys) <= FLOAT64_TOL
        run.record(part="target", name="lorenz-adaptive-f64",
                   what=f"{B} lanes, t in [0, {t1}], rtol = atol = 1e-8, float64, jit(grad)",
                   ms=t.median_s * 1e3, limit_ms=0.8, compile_s=t.compile_s, grad_rel_err=grad_err,
                   equal_steps=equal_steps, steps_max=int(np.max(ref.stats["num_steps"])),
                   status=_verdict(run, t.median_s * 1e3, 0.8, correct))


def target_big_adaptive(run: Run) -> None:
    """Adaptive Lorenz at B = 262,144 with every default (max_steps=4096, tape_rows chosen):
    a max_steps-sized tape would not fit (~90 GB); the ring must. Checked on the first lanes
    against the jax backend (per-lane controllers: a lane's steps do not depend on the others)."""
    B = run.size.big_adaptive_lanes
    checked = min(B, 4096)
    p = problems.LORENZ
    y0, rho = p.make(B, jnp.float32)
    kw = dict(args_axes=0, dt0=0.01, rtol=1e-6, atol=1e-6, ts=np.linspace(0.0, 1.0, 10))

    def loss(backend, y, r):
        sol = run.solve(p.field, y, 0.0, 1.0, args=r, backend=backend, **kw)
        return sum(jnp.sum(jnp.sin(y)) for y in sol.ys), sol.stats  # a sum over lanes: per-lane gradients

    fn = jax.jit(jax.grad(functools.partial(loss, "pallas"), argnums=1, has_aux=True))
    t = _time(run, fn, y0, rho, repeats=3)
    grad, stats = t.out
    head = lambda tree: jax.tree_util.tree_map(lambda x: x[:checked], tree)  # noqa: E731
    ref, ref_stats = jax.jit(jax.grad(functools.partial(loss, "jax"), argnums=1, has_aux=True))(head(y0), rho[:checked])
    grad_err = rel_err(grad[:checked], ref)
    steps = int(np.max(stats["num_steps"]))
    tol = rounding_tol(jnp.float32, 2 * steps)
    mem = jax.devices()[0].memory_stats() or {}
    run.record(part="target", name="big-adaptive", what=f"Lorenz {B} lanes adaptive rtol = atol = 1e-6, defaults, jit(grad)",
               ms=t.median_s * 1e3, compile_s=t.compile_s, grad_rel_err=grad_err, tol=tol, steps_max=steps,
               replayed_max=int(np.max(stats["num_replayed_iterations"])),
               peak_gb=mem.get("peak_bytes_in_use", float("nan")) / 1e9,
               device_gb=mem.get("bytes_limit", float("nan")) / 1e9,
               status=_verdict(run, 0, 0, grad_err <= tol))  # no time limit: it must run and be right


# --------------------------------------------------------------------------------- diffrax


def _diffrax_row(run: Run, name: str, adjoint: str, build: Callable, *, x64: bool = False) -> None:
    """Time ``build() -> (jitted fn, args, scale)``; scale extrapolates a shorter run."""
    with jax.enable_x64(x64):
        fn, args, scale = build()
        t = _time(run, fn, *args, repeats=3)
    run.record(part="diffrax", name=name, adjoint=adjoint, ms=t.median_s * 1e3 * scale, measured_ms=t.median_s * 1e3,
               extrapolated=scale != 1.0, scale=scale, compile_s=t.compile_s, status="ok")


def diffrax_parts(run: Run) -> list:
    """diffrax's fastest adjoint on each target workload, one part each."""
    import diffrax

    size, L = run.size, problems.LORENZ

    def vmapped(field, t1, dt0, adjoint, controller=diffrax.ConstantStepSize(), max_steps=None, args_axis=0):
        def one(y, a):
            return diffrax.diffeqsolve(diffrax.ODETerm(field), diffrax.Tsit5(), 0.0, t1, dt0, y, a,
                                       stepsize_controller=controller, adjoint=adjoint,
                                       max_steps=max_steps or int(round(t1 / dt0)) + 1).ys

        return jax.vmap(one, in_axes=(0, args_axis))

    def seed(name):
        p = problems.PROBLEMS[name]
        steps = size.diffrax_seed_steps
        fn = vmapped(p.field, steps * p.dt0, p.dt0, diffrax.DirectAdjoint(), args_axis=None)
        y0, _ = p.make(size.seed_lanes, jnp.float32)
        return jax.jit(jax.grad(lambda y: jnp.sum(fn(y, None)))), (y0,), (size.seed_t1 / p.dt0) / steps

    def lorenz_grad():
        fn = vmapped(L.field, L.dt0 * size.lorenz_steps, L.dt0, diffrax.RecursiveCheckpointAdjoint())
        y0, rho = L.make(size.lorenz_lanes, jnp.float32)
        return jax.jit(jax.grad(lambda r: jnp.sum(jnp.stack(fn(y0, r))))), (rho,), 1.0

    def lorenz_forward():
        fn = vmapped(L.field, L.dt0 * size.lorenz_steps, L.dt0, diffrax.RecursiveCheckpointAdjoint())
        return jax.jit(fn), L.make(size.diffrax_forward_lanes, jnp.float32), size.forward_lanes / size.diffrax_forward_lanes

    def lorenz_adaptive():
        fn = vmapped(L.field, size.adaptive_t1, None, diffrax.RecursiveCheckpointAdjoint(checkpoints=512),
                     diffrax.PIDController(rtol=1e-8, atol=1e-8), max_steps=512)
        y0, rho = L.make(size.adaptive_lanes, jnp.float64)
        return jax.jit(jax.grad(lambda r: jnp.sum(jnp.stack(fn(y0, r))))), (rho,), 1.0

    rows = [("seed", "DirectAdjoint", functools.partial(seed, "seed"), False),
            ("seed-nl", "DirectAdjoint", functools.partial(seed, "seed-nl"), False),
            ("lorenz-grad", "RecursiveCheckpointAdjoint", lorenz_grad, False),
            ("lorenz-forward", "forward", lorenz_forward, False),
            ("lorenz-adaptive-f64", "RecursiveCheckpointAdjoint(checkpoints=max_steps)", lorenz_adaptive, True)]
    return [(f"diffrax {name}", functools.partial(_diffrax_row, run, name, adjoint, build, x64=x64))
            for name, adjoint, build, x64 in rows]


# ------------------------------------------------------------------------------- the run


def _both_ways(run: Run, module, flag: str, name: str, build, args, tol, what: str) -> None:
    """Time ``build()`` (a fresh jit, traced with ``module.flag`` as set) with the flag on and
    off, and record one ``compare`` row; both ways must compute the same gradient."""
    previous = getattr(module, flag)
    timings = {}
    try:
        for on in (True, False):
            setattr(module, flag, on)
            timings[on] = _time(run, build(), *args)
    finally:
        setattr(module, flag, previous)
    diff = rel_err(timings[True].out, timings[False].out)
    run.record(part="compare", name=name, what=what, ms=timings[True].median_s * 1e3,
               ms_without=timings[False].median_s * 1e3, grad_rel_diff=diff, status="ok" if diff <= tol else "FAIL")


def _lorenz_adaptive_f64_grad(run: Run):
    """The float64 adaptive Lorenz gradient of its target: (build, args, what)."""
    y, r, t1, _, _, loss = _lorenz(run, run.size.adaptive_lanes, jnp.float64, adaptive=True)
    return (lambda: jax.jit(jax.grad(lambda y, r: loss("pallas", y, r)[0], argnums=(0, 1))), (y, r),
            f"Lorenz, {run.size.adaptive_lanes} lanes, t in [0, {t1}], rtol = atol = 1e-8, float64")


def compare_pipelined_sweep(run: Run) -> None:
    """The reverse kernel's walk with and without its one-row prefetch (``kernels/reverse.py``
    PIPELINE), on two gradients whose reverse walks read a tape: seed-nl (float32, fixed steps,
    2,250 lanes: few warps per SM to hide a load behind) and the float64 adaptive Lorenz of its
    target. The measurement that keeps the prefetch or turns it off; both ways compute the
    same gradient (the same operations, loaded earlier)."""
    from fusedrk.kernels import reverse

    y0, steps, grad_of = _seed_workload(run, "seed-nl")
    _both_ways(run, reverse, "PIPELINE", "pipelined-sweep seed-nl", lambda: grad_of("pallas"), (y0,),
               rounding_tol(jnp.float32, steps), f"seed-nl, {steps} steps x {run.size.seed_lanes} lanes, jit(grad)")
    with jax.enable_x64(True):
        build, args, what = _lorenz_adaptive_f64_grad(run)
        _both_ways(run, reverse, "PIPELINE", "pipelined-sweep lorenz-adaptive-f64", build, args, FLOAT64_TOL, what)


def compare_finished_rows(run: Run) -> None:
    """Adaptive gradients with a finished lane writing no more tape rows and the reverse kernel
    loading only the rows each lane wrote, against every lane writing every row
    (``kernels/forward.py`` SKIP_FINISHED_ROWS): the float64 adaptive Lorenz of its target, and
    Van der Pol with per-lane mu (float32, rtol = atol = 1e-6, step counts far apart). The
    measurement that keeps the predicated stores and loads or drops them; both ways compute the
    same gradient (a finished lane's masked VJP adds zero either way)."""
    # fusedrk.kernels.forward is also the name of the package's forward function.
    forward_module = importlib.import_module("fusedrk.kernels.forward")
    with jax.enable_x64(True):
        build, args, what = _lorenz_adaptive_f64_grad(run)
        _both_ways(run, forward_module, "SKIP_FINISHED_ROWS", "finished-rows lorenz-adaptive-f64", build, args,
                   FLOAT64_TOL, what)
    p = problems.VDP
    B, t1 = run.size.adaptive_lanes, p.t1 * run.size.adaptive_t1
    y0, mu = p.make(B, jnp.float32)

    def solve(mu):
        return run.solve(p.field, y0, p.t0, t1, args=mu, args_axes=0, dt0=p.dt0, rtol=1e-6, atol=1e-6,
                         max_steps=4096, backend="pallas")

    steps = solve(mu).stats["num_steps"]
    loss = lambda mu: _weighted_loss(solve(mu).ys)  # noqa: E731
    _both_ways(run, forward_module, "SKIP_FINISHED_ROWS", "finished-rows vdp", lambda: jax.jit(jax.grad(loss)), (mu,),
               rounding_tol(jnp.float32, int(jnp.max(steps))),
               f"Van der Pol, {B} lanes, per-lane mu, t in [0, {t1:g}], float32, steps {int(jnp.min(steps))}"
               f"-{int(jnp.max(steps))}")


def compare_launch_shapes(run: Run) -> None:
    """The seed and seed-nl gradients (2,250 lanes) at 16, 32, 64 and 128 lanes per program,
    with 1, 1, 2 and 4 warps (a warp per 32 lanes; 16 lanes leave half a warp idle): 141, 71,
    36 and 18 programs on the GPU's SMs. ``kernels/_triton.choose_launch`` picks 16 lanes for
    this batch on an H100 (the largest tile whose programs cover all 132 SMs) from a model:
    each warp's step is latency-bound and its instructions do not change with the tile, so
    covering more SMs cannot be slower. These rows test that model; 128 lanes and 4 warps (the
    launch before it, 18 programs) is the reference the gradients are compared with. Every
    launch computes the same gradient (the same per-lane arithmetic; neither workload has a
    shared argument)."""
    from fusedrk.kernels import _triton

    shapes = [(16, 1), (128, 4)] if run.quick else [(16, 1), (32, 1), (64, 2), (128, 4)]
    previous = _triton.LAUNCH_OVERRIDE
    # --quick: 32 lanes, two programs of 16 against one of 128 (interpret mode runs programs
    # one after another: 16 of them at the quick size's 256 lanes took most of its smoke test).
    B = 32 if run.quick else run.size.seed_lanes
    try:
        for name in ("seed", "seed-nl"):
            y0, steps, grad_of = _seed_workload(run, name)
            y0 = y0[:B]
            timings = {}
            for tile, warps in shapes:
                _triton.LAUNCH_OVERRIDE = _triton.LaunchConfig(lane_tile=tile, num_warps=warps)
                timings[tile, warps] = _time(run, grad_of("pallas"), y0)
            default = timings[128, 4].out
            for (tile, warps), t in timings.items():
                diff = rel_err(t.out, default)
                run.record(part="compare", name=f"launch {name} {tile} lanes {warps} warps",
                           what=f"{steps} steps x {B} lanes, jit(grad), {-(-B // tile)} programs",
                           ms=t.median_s * 1e3, compile_s=t.compile_s, grad_rel_diff=diff,
                           status="ok" if diff <= rounding_tol(jnp.float32, steps) else "FAIL")
    finally:
        _triton.LAUNCH_OVERRIDE = previous


def _out_of_time(run: Run, name: str) -> bool:
    if run.elapsed() > run.budget_s:
        run.record(part="skipped", name=name, status="skipped", reason=f"budget of {run.budget_s:.0f} s spent")
        return True
    return False


def _failed(run: Run, name: str) -> None:
    run.log(f"{name} raised:\n{traceback.format_exc()}")
    run.record(part="error", name=name, status="ERROR", error=traceback.format_exc().strip().splitlines()[-1])


def parts(run: Run) -> list:
    out = [(f"check {c.name}", functools.partial(check_case, run, c)) for c in correctness_cases(run.quick)
           if run.checks is None or c.name in run.checks]
    out += [("target seed", functools.partial(target_seed, run, "seed")),
            ("target seed-nl", functools.partial(target_seed, run, "seed-nl")),
            ("target lorenz-grad", functools.partial(target_lorenz_grad, run)),
            ("target lorenz-vector", functools.partial(target_lorenz_vector, run)),
            ("target lorenz-forward", functools.partial(target_lorenz_forward, run)),
            ("target tape-traffic", functools.partial(target_tape_traffic, run)),
            ("target lorenz-adaptive-f64", functools.partial(target_lorenz_adaptive_f64, run)),
            ("target big-adaptive", functools.partial(target_big_adaptive, run))]
    # Measurements for choices still open come last: what the run has time for after the
    # targets and diffrax's rows.
    return out + diffrax_parts(run) + [
        ("compare pipelined-sweep", functools.partial(compare_pipelined_sweep, run)),
        ("compare finished-rows", functools.partial(compare_finished_rows, run)),
        ("compare launch-shapes", functools.partial(compare_launch_shapes, run))]


def versions() -> dict:
    out = {}
    for name in ("jax", "jaxlib", "triton", "diffrax", "equinox"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # absent (triton on a CPU machine)
            out[name] = "absent"
    device = jax.devices()[0]
    out["device"] = f"{device.platform}: {device.device_kind}"
    return out


def table(rows: list) -> str:
    lines = ["| part | name | status | ms (limit) | correctness |", "|---|---|---|---|---|"]
    lines = [" ".join(f"{k} {v}" for k, v in rows[0].items() if k not in ("t_s", "part", "status")), ""] + lines
    diffrax = {r["name"]: r for r in rows if r["part"] == "diffrax"}
    for r in rows:
        if r["part"] in ("diffrax", "versions"):
            continue
        if "ms" in r:
            timing = f"{r['ms']:.2f}" + (f" ({r['limit_ms']:g})" if "limit_ms" in r else "")
            timing += f"; without: {r['ms_without']:.2f}" if "ms_without" in r else ""
        elif "ratio" in r:
            timing = f"tape {r['tape_gbps']:.0f} GB/s = {r['ratio']:.0%} of copy {r['copy_gbps']:.0f} GB/s (70%)"
        else:
            timing = ""
        if r["name"] in diffrax:
            d = diffrax[r["name"]]
            timing += f"; diffrax {d['adjoint']} {d['ms']:.0f} ms{' (extrapolated)' if d['extrapolated'] else ''}"
        figures = [f"{k} {_short(r[k])}" for k in ("ys_rel_err", "grad_rel_err", "grad_rel_diff", "equal_steps_fraction",
                                                  "equal_steps", "tol_ys", "tol_grad", "tol", "peak_gb",
                                                  "device_gb", "replayed_max") if r.get(k) is not None]
        lines.append(f"| {r['part']} | {r['name']} | {r['status']} | {timing} | {', '.join(figures) or r.get('error', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                        help="folder for results.jsonl, log.txt and table.md")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip the parts left after this many seconds")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run); targets are not judged")
    parser.add_argument("--interpret", action="store_true", help="kernels in interpret mode (a CPU smoke run)")
    parser.add_argument("--checks", nargs="*", metavar="NAME",
                        help="run only these correctness checks (default: all of them; targets always run)")
    opts = parser.parse_args(argv)
    names = {c.name for c in correctness_cases(opts.quick)}
    if opts.checks is not None and not set(opts.checks) <= names:
        parser.error(f"unknown checks {sorted(set(opts.checks) - names)}; known: {sorted(names)}")
    if not opts.interpret and jax.default_backend() != "gpu":
        parser.error(f"the default JAX device is {jax.default_backend()}: run on a GPU, or pass --interpret")
    run = Run(opts)
    run.record(part="versions", status="ok", **versions())
    for name, fn in parts(run):
        if _out_of_time(run, name):
            continue
        run.log(f"-- {name}")
        try:
            fn()
        except Exception:
            _failed(run, name)
    text = table(run.rows)
    with open(os.path.join(run.out, "table.md"), "w") as fh:
        fh.write(text + "\n")
    run.log("\n" + text)
    bad = [r for r in run.rows if r["status"] in ("FAIL", "ERROR", "skipped")]
    run.log(f"done in {run.elapsed():.0f} s: {len(bad)} of {len(run.rows) - 1} results failed, raised or were skipped")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
