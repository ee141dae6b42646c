"""python -m bench: fusedrk against every diffrax adjoint on the project's workloads.

    python -m bench --quick                      # CPU-sized, under 2 minutes on 2 cores
    python -m bench                              # full size, for one GPU run
    python -m bench --workloads seed lorenz --methods fusedrk-jax diffrax-direct --out DIR

Every timing: compile separately, warm-up, block_until_ready, median (and p20/p80) of repeats,
beside the relative error of the result and of the gradient against the oracle
(jax.vmap(diffrax.diffeqsolve) with RecursiveCheckpointAdjoint). A result outside its
rounding-derived tolerance marks the row FAILED. Writes results.csv, results.md and
results.png under --out (default bench/results/) and prints the markdown table last.
See bench/README.md for the columns.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import jaxlib

import fusedrk
from bench import peers
from fusedrk import _liveness, problems
from fusedrk._measure import rel_err, timed
from fusedrk._solve import tape_plan

DIFFRAX_METHODS = {
    "diffrax-rca": lambda steps: diffrax.RecursiveCheckpointAdjoint(),
    "diffrax-rca-full": lambda steps: diffrax.RecursiveCheckpointAdjoint(checkpoints=steps),
    "diffrax-direct": lambda steps: diffrax.DirectAdjoint(),
    "diffrax-backsolve": lambda steps: diffrax.BacksolveAdjoint(),
    "diffrax-allsave": lambda steps: fusedrk.AllSaveAdjoint(),
}
FUSEDRK_METHODS = ("fusedrk-jax", "fusedrk-pallas")
# The readme workload also runs the jax backend with a ring of a quarter of its iterations
# (so three quarters of them are replayed once): the price of a tape too small for the solve.
QUARTER_TAPE = "fusedrk-jax-quarter-tape"
README_METHODS = [m for m in DIFFRAX_METHODS if m != "diffrax-allsave"] + ["fusedrk-jax", QUARTER_TAPE]
FULL_ALL_ADJOINTS_B = 2**16  # the ensembles' size at which full mode runs every diffrax adjoint
DEFAULT = "diffrax-rca"  # diffrax's default adjoint: the speed-up baseline and the oracle
COLUMNS = ["device", "jax", "jaxlib", "diffrax", "workload", "mode", "B", "steps", "method", "compile_s",
           "median_ms", "p20_ms", "p80_ms", "extrapolated", "speedup_vs_diffrax_default", "tape_bytes",
           "tape_gbps", "traj_steps_per_s", "ys_rel_err", "grad_rel_err", "status"]


class Case(NamedTuple):
    """One workload at one size: how to build each method's loss(params) at a horizon."""

    workload: str
    mode: str  # "grad" or "forward"
    B: int
    t1: float  # fusedrk's horizon
    t1_diffrax: float  # diffrax's (shorter for the 80,000-step seed; timings extrapolated)
    steps: int  # fixed steps at t1, or max_steps for adaptive solves
    adaptive: bool
    params: jax.Array
    ours: Callable  # ours(backend, t1, interpret) -> fn(params) returning (loss, ys)
    theirs: Callable  # theirs(adjoint, t1) -> fn(params) returning (loss, ys)
    state_per_lane: int  # floats of state per lane (tape accounting)
    peer: Callable | None  # peer(name, t1) -> peers.PeerRun, for the fixed-step workloads
    tape_live: tuple | None = None  # the state components the tape holds (fusedrk/_liveness.py; None: all)


def _seed_case(name, quick):
    p = problems.PROBLEMS[name]
    # Quick: 800 steps of the seed, 200 of the costlier state-dependent variant.
    t1 = (80.0 if name == "seed" else 20.0) if quick else p.t1
    t1_diffrax = t1 if quick else 200.0  # 2,000 steps: ~1.7 s per RCA gradient on an H100
    y0, _ = p.make(2250, jnp.float32)

    def loss(horizon):  # sum(y(t1)); the seed's scaled to keep its gradient O(1) in float32
        scale = problems.seed_loss_scale(p.t0, horizon) if name == "seed" else 1.0
        return lambda ys: scale * ys.sum()  # array methods: the torch peers call it too

    def ours(backend, horizon, interpret=False):
        steps = int(round(horizon / p.dt0))

        def fn(y0):
            sol = fusedrk.solve(p.field, y0, p.t0, horizon, dt0=p.dt0, max_steps=steps + 1, backend=backend,
                                interpret=interpret)
            return loss(horizon)(sol.ys), sol.ys[:, 0]

        return fn

    def theirs(adjoint, horizon):
        steps = int(round(horizon / p.dt0))

        def fn(y0):  # the seed as docs/design.md states it: one ODE with y in R^2250
            sol = diffrax.diffeqsolve(diffrax.ODETerm(p.field), diffrax.Tsit5(), p.t0, horizon, p.dt0, y0,
                                      max_steps=steps + 1, adjoint=adjoint)
            return loss(horizon)(sol.ys), sol.ys[0]

        return fn

    def peer(peer_name, horizon):
        return peers.run(peer_name, peers.Spec(name, (y0,), p.t0, horizon, p.dt0, None, loss(horizon)))

    reads = _liveness.field_read_components(p.field, jax.ShapeDtypeStruct((), jnp.float32))
    # The seed's forward too: a solve without a gradient runs the jax backend's lean loop.
    modes = ("grad", "forward") if name == "seed" else ("grad",)
    return [Case(name, mode, 2250, t1, t1_diffrax, int(round(t1 / p.dt0)), False, y0, ours, theirs, 1, peer,
                 tape_live=reads) for mode in modes]


def _ensemble_cases(name, quick, sizes):
    adaptive = name.endswith("-adaptive") or name == "vdp"
    p = problems.VDP if name == "vdp" else problems.LORENZ
    ts = jnp.linspace(p.t1 / 10, p.t1, 10)
    tol = dict(rtol=1e-6, atol=1e-6) if adaptive else {}
    max_steps = 1024 if adaptive else int(round(p.t1 / p.dt0)) + 1

    def make(B):
        y0, param = p.make(B, jnp.float32)

        def loss_of(ys):  # array methods: the torch peers call it too
            return sum((leaf ** 2).mean() for leaf in jax.tree_util.tree_leaves(ys))

        def ours(backend, horizon, interpret=False):
            def fn(param):
                sol = fusedrk.solve(p.field, y0, p.t0, horizon, args=param, args_axes=0, dt0=p.dt0, ts=ts,
                                    max_steps=max_steps, backend=backend, interpret=interpret, **tol)
                return loss_of(sol.ys), sol.ys

            return fn

        def theirs(adjoint, horizon):
            controller = diffrax.PIDController(**tol) if adaptive else diffrax.ConstantStepSize()

            def fn(param):
                def one(y0_lane, param_lane):
                    return diffrax.diffeqsolve(diffrax.ODETerm(p.field), diffrax.Tsit5(), p.t0, horizon, p.dt0, y0_lane,
                                               param_lane, saveat=diffrax.SaveAt(ts=ts), adjoint=adjoint,
                                               stepsize_controller=controller, max_steps=max_steps).ys

                ys = jax.vmap(one)(y0, param)
                return loss_of(ys), ys

            return fn

        def peer(peer_name, horizon):
            return peers.run(peer_name, peers.Spec(name, y0, p.t0, horizon, p.dt0, ts, loss_of))

        return param, ours, theirs, (None if adaptive else peer)

    state = 2 if name == "vdp" else 3
    cases = []
    for B in sizes:
        param, ours, theirs, peer = make(B)
        for mode in ("grad", "forward"):
            cases.append(Case(name, mode, B, p.t1, p.t1, max_steps, adaptive, param, ours, theirs, state, peer))
    return cases


def _readme_case():
    """The README's example exactly as written: 4,096 Lorenz lanes, adaptive rtol = atol = 1e-6,
    10 save times, every other argument (max_steps, tape_rows) left at its default."""

    lorenz = problems.lorenz_field  # the README's lorenz, operation for operation
    B = 4096
    y0 = (jnp.ones(B), jnp.zeros(B), jnp.zeros(B))
    rho = jnp.linspace(20.0, 30.0, B)
    ts = jnp.linspace(0.0, 1.0, 10)
    kw = dict(args=rho, args_axes=0, dt0=0.01, rtol=1e-6, atol=1e-6, ts=ts)
    iterations = int(jnp.max(fusedrk.solve(lorenz, y0, 0.0, 1.0, **kw).stats["num_steps"]))

    def ours(backend, horizon, interpret=False, tape_rows=None):
        def fn(rho):
            sol = fusedrk.solve(lorenz, y0, 0.0, horizon, **{**kw, "args": rho}, tape_rows=tape_rows,
                                backend=backend, interpret=interpret)
            return jnp.mean(sol.ys[2] ** 2), sol.ys

        return fn

    ours.quarter = -(-iterations // 4)

    def theirs(adjoint, horizon):
        def fn(rho):
            def one(y0_lane, rho_lane):
                return diffrax.diffeqsolve(diffrax.ODETerm(lorenz), diffrax.Tsit5(), 0.0, horizon, 0.01, y0_lane,
                                           rho_lane, saveat=diffrax.SaveAt(ts=ts), adjoint=adjoint,
                                           stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6)).ys

            ys = jax.vmap(one)(y0, rho)
            return jnp.mean(ys[2] ** 2), ys

        return fn

    return [Case("readme", "grad", B, 1.0, 1.0, iterations, True, rho, ours, theirs, 3, None)]


def build_cases(workloads, quick):
    cases = []
    for name in workloads:
        if name in ("seed", "seed-nl"):
            cases += _seed_case(name, quick)
        elif name == "lorenz":
            cases += _ensemble_cases(name, quick, [2**k for k in ((6, 8) if quick else range(10, 21, 2))])
        elif name == "lorenz-adaptive":
            cases += _ensemble_cases(name, quick, [2**6] if quick else [2**12, 2**16])
        elif name == "vdp":
            cases += _ensemble_cases(name, quick, [64] if quick else [FULL_ALL_ADJOINTS_B])
        elif name == "readme":
            cases += _readme_case()
    return cases


def tolerance(steps: int) -> float:
    """Relative error allowed between two float32 Tsit5 implementations (see tests/conftest)."""
    return 10 * float(jnp.finfo(jnp.float32).eps) * steps * 10  # x10: gradients sweep twice


def runner(case: Case, method: str, horizon: float, interpret: bool) -> peers.PeerRun:
    """The method's gradient and forward functions of the case's parameters at ``horizon``."""
    if method in peers.PEERS:
        return case.peer(method, horizon)
    if method == QUARTER_TAPE:
        fn = case.ours("jax", horizon, interpret, tape_rows=case.ours.quarter)
    elif method in FUSEDRK_METHODS:
        fn = case.ours(method.split("-")[1], horizon, interpret)
    else:
        fn = case.theirs(DIFFRAX_METHODS[method](case.steps), horizon)
    return peers.PeerRun(jax.jit(jax.grad(lambda x: fn(x)[0])), jax.jit(lambda x: fn(x)[1]), jax.block_until_ready)


def run_case(case: Case, method: str, repeats: int, get_run: Callable, oracle: dict, budget_s=None) -> dict:
    """Times one method on one case and checks it; get_run(case, method, horizon) -> PeerRun."""
    is_ours = method in FUSEDRK_METHODS or method == QUARTER_TAPE
    horizon = case.t1 if is_ours else case.t1_diffrax
    run = get_run(case, method, horizon)
    timed_fn = run.grad if case.mode == "grad" else run.forward
    out, compile_s, p20, p50, p80 = timed(timed_fn, case.params, repeats=repeats, sync=run.sync, budget_s=budget_s)
    scale = (case.t1 / case.t1_diffrax) if not is_ours else 1.0
    # Accuracy at diffrax's horizon, against the oracle there (the timed result when the
    # horizons agree, which saves a compilation).
    check = get_run(case, method, case.t1_diffrax) if horizon != case.t1_diffrax else run
    if case.mode == "forward" and check is run:
        ys, grad = out, None
    else:
        ys = check.forward(case.params)
        grad = None if case.mode == "forward" else (out if check is run else check.grad(case.params))
    ys_err = rel_err(ys, oracle["ys"])
    grad_err = rel_err(grad, oracle["grad"]) if grad is not None else float("nan")
    steps_checked = case.steps * case.t1_diffrax / case.t1
    bad = ys_err > tolerance(steps_checked) or (grad is not None and not grad_err <= tolerance(steps_checked))
    row = dict(workload=case.workload, mode=case.mode, B=case.B, steps=case.steps, method=method,
               compile_s=compile_s, median_ms=p50 * 1e3 * scale, p20_ms=p20 * 1e3 * scale, p80_ms=p80 * 1e3 * scale,
               extrapolated=scale != 1.0, ys_rel_err=ys_err, grad_rel_err=grad_err, status="FAILED" if bad else "ok")
    row["traj_steps_per_s"] = case.B * case.steps / (row["median_ms"] / 1e3)
    if is_ours and case.mode == "grad":
        lanes = (jnp.zeros((case.B, case.state_per_lane), jnp.float32),)
        backend = "jax" if method == QUARTER_TAPE else method.removeprefix("fusedrk-")
        plan = tape_plan(lanes, jnp.float32, rows=case.steps + 1, backend=backend, adaptive=case.adaptive,
                         known_fixed=not case.adaptive, tape_live=case.tape_live,
                         tape_rows=case.ours.quarter if method == QUARTER_TAPE else None)
        row["tape_bytes"] = plan.bytes
        row["tape_gbps"] = 2 * row["tape_bytes"] / (row["median_ms"] / 1e3) / 1e9
    return row


def figure(rows):
    """The results figure: jit(grad) time against batch size (one marker per measured B, joined
    when a series has several) and the speed-up bars, titled with the device and workloads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 20, 50, 100 rather than 2x10^1 on log axes
    # Minor ticks labelled at 2x and 5x a power of ten only: readable over several decades.
    sparse = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else "")
    grads = [r for r in rows if r["mode"] == "grad"]
    bars = sum(1 for r in grads if r.get("speedup_vs_diffrax_default"))
    fig, (ax_time, ax_speed) = plt.subplots(1, 2, figsize=(14, max(5, 0.22 * bars)))
    series = {}
    for r in grads:
        if r["status"] == "ok":
            series.setdefault((r["workload"], r["method"]), []).append((r["B"], r["median_ms"]))
    for (workload, method), points in sorted(series.items()):
        b, ms = zip(*sorted(points))
        # A workload measured at one B (the seeds) is a single marker: still a point to read.
        ax_time.plot(b, ms, marker="o", linestyle="-" if len(points) > 1 else "none", label=f"{workload} {method}")
    ax_time.set_xscale("log")
    ax_time.set_yscale("log")
    for axis in (ax_time.xaxis, ax_time.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(sparse)
    ax_time.set_xlabel("batch size B")
    ax_time.set_ylabel("jit(grad) time [ms]")
    ax_time.set_title("jit(grad) time vs batch size (median)")
    if ax_time.lines:
        ax_time.legend(fontsize=7, loc="best")
    labels, speedups, colors = [], [], []
    for r in grads:
        if r.get("speedup_vs_diffrax_default"):
            labels.append(f"{r['workload']} B={r['B']} {r['method']}{' *' if r['extrapolated'] else ''}")
            speedups.append(r["speedup_vs_diffrax_default"])
            colors.append("tab:orange" if r["method"].startswith("fusedrk") else "tab:blue")
    ax_speed.barh(range(len(speedups)), speedups, color=colors)
    ax_speed.set_yticks(range(len(speedups)), labels, fontsize=7)
    ax_speed.invert_yaxis()  # top to bottom in the table's order
    ax_speed.set_xscale("log")
    ax_speed.xaxis.set_major_formatter(plain)
    ax_speed.xaxis.set_minor_formatter(sparse)
    ax_speed.axvline(1.0, color="k", lw=0.8)
    footnote = "\n* timed on a shorter horizon, extrapolated" if any(r["extrapolated"] for r in grads) else ""
    ax_speed.set_xlabel(f"speed-up vs {DEFAULT} (jit(grad)); > 1 is faster{footnote}")
    ax_speed.set_title(f"jit(grad) speed-up vs diffrax's default adjoint ({DEFAULT})")
    devices = sorted({str(r.get("device", "?")) for r in rows})
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig.suptitle(f"fusedrk vs diffrax on {', '.join(devices)}: workloads {', '.join(workloads)}")
    fig.tight_layout()
    return fig


def plot(rows, path):
    import matplotlib.pyplot as plt

    fig = figure(rows)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows) -> str:
    head = "| workload | mode | B | steps | method | median ms | speed-up | tape GB/s | ys err | grad err | status |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        speed = r.get("speedup_vs_diffrax_default")
        gbps = r.get("tape_gbps")
        lines.append(
            f"| {r['workload']} | {r['mode']} | {r['B']} | {r['steps']} | {r['method']} | "
            f"{r['median_ms']:.2f}{'*' if r['extrapolated'] else ''} | {f'{speed:.1f}x' if speed else ''} | "
            f"{f'{gbps:.1f}' if gbps else ''} | {r['ys_rel_err']:.1e} | {r['grad_rel_err']:.1e} | {r['status']} |"
        )
    if any(r["extrapolated"] for r in rows):
        lines.append("\n`*` diffrax (and any peer) timed on a shorter horizon and extrapolated linearly per step.")
    return "\n".join(lines)


def readme_summary(rows) -> str | None:
    """The README example's two ratios: fusedrk against diffrax's fastest adjoint, and the
    quarter-size tape against the fitting one (the rows above carry each result's check)."""
    readme = {r["method"]: r for r in rows if r["workload"] == "readme" and r["status"] == "ok"}
    theirs = {m: r["median_ms"] for m, r in readme.items() if m in DIFFRAX_METHODS}
    if "fusedrk-jax" not in readme or not theirs:
        return None
    fastest = min(theirs, key=theirs.get)
    ours = readme["fusedrk-jax"]["median_ms"]
    lines = [f"readme example: fusedrk-jax {ours:.1f} ms, diffrax's fastest adjoint ({fastest}) "
             f"{theirs[fastest]:.1f} ms: {theirs[fastest] / ours:.1f}x faster"]
    if QUARTER_TAPE in readme:
        quarter = readme[QUARTER_TAPE]["median_ms"]
        lines.append(f"readme example, tape_rows a quarter of the iterations: {quarter:.1f} ms, "
                     f"{quarter / ours:.2f}x the fitting tape's time")
    return "\n".join(lines)


WORKLOADS = ("seed", "seed-nl", "lorenz", "lorenz-adaptive", "vdp", "readme")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where the help text says what None or a flag's
    absence means."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        if isinstance(action.default, (list, tuple)):
            return f"{action.help} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--out", default=os.path.join("bench", "results"), metavar="DIR",
                        help="folder for results.csv, results.md and results.png (created if missing)")
    parser.add_argument("--quick", action="store_true", help="CPU-sized run (about 2 minutes on 2 cores)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS, metavar="NAME",
                        help="workloads to run (bench/README.md describes them); choices: %(choices)s")
    parser.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                        choices=[*DIFFRAX_METHODS, *FUSEDRK_METHODS, QUARTER_TAPE, *peers.PEERS],
                        help="methods to time (diffrax-rca, the oracle, always runs); default: every diffrax "
                             "adjoint and fusedrk-jax, plus fusedrk-pallas on a GPU and the installed peers on "
                             "the fixed-step workloads; choices: %(choices)s")
    parser.add_argument("--interpret", action="store_true", help="run fusedrk-pallas in interpret mode")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per row after the warm-up; default: 5, or 3 with --quick")
    opts = parser.parse_args(argv)
    from tqdm import tqdm

    repeats = opts.repeats or (3 if opts.quick else 5)

    installed = []
    for peer in peers.PEERS:
        reason = peers.missing(peer)
        if reason:
            print(f"note: {peer}: {reason}; its rows are skipped")
        else:
            installed.append(peer)
            print(f"note: {peer} is timed on the fixed-step workloads ({', '.join(peers.WORKLOADS)})")

    def methods_for(case):
        if opts.methods:
            chosen = opts.methods
        elif case.workload == "readme":
            # Against every diffrax adjoint but AllSave (whose storage is max_steps-sized: see
            # README), to find diffrax's fastest; plus the price of a quarter-size tape.
            chosen = README_METHODS + (["fusedrk-pallas"] if jax.default_backend() == "gpu" else [])
        elif opts.quick and case.workload != "seed":
            # Quick mode measures every method on the seed only: compilation dominates a
            # 2-core budget. Elsewhere diffrax's default adjoint (the oracle) and fusedrk,
            # and AllSaveAdjoint on seed-nl.
            chosen = ["diffrax-allsave", "fusedrk-jax"] if case.workload == "seed-nl" else ["fusedrk-jax"]
        else:
            chosen = [*DIFFRAX_METHODS, "fusedrk-jax"] + (["fusedrk-pallas"] if jax.default_backend() == "gpu" else [])
            chosen += installed
            if not opts.quick and case.workload not in ("seed", "seed-nl") and case.B != FULL_ALL_ADJOINTS_B:
                # Full mode sweeps B with the oracle, fusedrk and the peers; every diffrax
                # adjoint runs at the docs/design.md reference size only (an 8-minute budget:
                # vmapped RCA alone is 1.15 s per gradient at B = 2^16 on an H100).
                chosen = [m for m in chosen if m not in DIFFRAX_METHODS]
        chosen = chosen if DEFAULT in chosen else [DEFAULT, *chosen]
        chosen = [m for m in chosen if m not in peers.PEERS or (m in installed and case.peer is not None)]
        if case.mode == "forward":  # the adjoint does not matter for a forward solve
            chosen = [m for m in chosen if m in (DEFAULT, *FUSEDRK_METHODS, *peers.PEERS)]
        return chosen
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, jaxlib=jaxlib.__version__,
                diffrax=diffrax.__version__)
    cases = build_cases(opts.workloads, opts.quick)
    built = {}

    def get_run(case, method, horizon):
        # Built once per workload, size, method and horizon: the oracle's compiled functions
        # are the ones its own row then times, and a forward case reuses the forward its
        # gradient case compiled for the accuracy check.
        key = (case.workload, case.B, method, horizon)
        if key not in built:
            built[key] = runner(case, method, horizon, opts.interpret)
        return built[key]

    rows = []
    with tqdm(total=sum(len(methods_for(c)) for c in cases), desc="bench", file=sys.stderr) as bar:
        for case in cases:
            oracle_run = get_run(case, DEFAULT, case.t1_diffrax)
            oracle = dict(ys=oracle_run.forward(case.params))
            if case.mode == "grad":
                oracle["grad"] = oracle_run.grad(case.params)
            case_rows = []
            for method in methods_for(case):
                bar.set_postfix_str(f"{case.workload} {case.mode} B={case.B} {method}")
                try:
                    row = run_case(case, method, repeats, get_run, oracle, None if opts.quick else 10.0)
                except Exception as e:  # a method that cannot run this case is reported, not hidden
                    row = dict(workload=case.workload, mode=case.mode, B=case.B, steps=case.steps, method=method,
                               compile_s=float("nan"), median_ms=float("nan"), p20_ms=float("nan"),
                               p80_ms=float("nan"), extrapolated=False, ys_rel_err=float("nan"),
                               grad_rel_err=float("nan"), status=f"FAILED: {type(e).__name__}: {str(e)[:80]}")
                case_rows.append(row)
                bar.update()
            base = next((r["median_ms"] for r in case_rows if r["method"] == DEFAULT), None)
            for r in case_rows:
                r["speedup_vs_diffrax_default"] = base / r["median_ms"] if base and r["median_ms"] > 0 else None
                rows.append({**meta, **r})
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "results.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in COLUMNS})
    table = markdown(rows)
    with open(os.path.join(opts.out, "results.md"), "w") as fh:
        fh.write(f"device {meta['device']}, jax {meta['jax']}, diffrax {meta['diffrax']}\n\n{table}\n")
    plot(rows, os.path.join(opts.out, "results.png"))
    print(f"device {meta['device']}, jax {meta['jax']}, jaxlib {meta['jaxlib']}, diffrax {meta['diffrax']}")
    print(table)
    summary = readme_summary(rows)
    if summary:
        print(summary)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
