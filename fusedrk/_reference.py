"""Backend "jax": a while-loop driver over the whole batch, the tape arrays, the reverse sweep.

Owns: looping and memory movement for the pure-JAX path. The forward loop advances every lane
by one attempted step per iteration (each lane its own t, h, accept/reject and finished flag,
exactly what ``jax.vmap(diffrax.diffeqsolve)`` computes) and, when a gradient will be taken,
writes the start state, k_1..k_6 and (adaptive steps) the step's interval and an accepted flag
of every iteration into a ring of tape rows, with a checkpoint of the loop carry at the start
of every segment (``_schedule.py``). The reverse loop walks the rows backwards, re-running an
earlier segment from its checkpoint once when the ring did not hold the whole solve.

Must not: contain step algebra (that is ``_step.py``), validate user input or know about
pytrees of the user's state (that is ``_solve.py``). States here are tuples of [B, ...] leaves.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _liveness, _schedule, _step, _uninitialised
from ._tableau import NUM_STAGES

# Result codes, shared with the public RESULTS in _solve.py. 1 is diffrax's max_steps_reached.
SUCCESSFUL = 0
MAX_STEPS_REACHED = 1
NONFINITE = 2

# Rows of k stored per iteration: k_7 is never needed by the reverse sweep (see _step).
TAPE_STAGES = NUM_STAGES - 1


class Config(NamedTuple):
    """Static description of one solve (hashable; no arrays)."""

    adaptive: bool
    save_ts: bool  # True: save at ts; False: save y(t1) only
    rows: int  # loop bound: max_steps, or fewer for known fixed steps
    tape_rows: int  # R: rows of the tape ring, iterations per checkpointed segment (_schedule)
    # The state components the tape stores (each step's start state and increments): per
    # leaf, the flat indices (C order over one lane's shape) of those the field's VJP reads
    # (fusedrk/_liveness.py, ``read_components``); None: every component.
    tape_live: Optional[tuple] = None

    @property
    def tape_state(self) -> bool:
        """Whether the tape stores any state component (not for a field linear in y)."""
        return self.tape_live is None or any(self.tape_live)


def tape_columns(config: Config, leaf_sizes) -> tuple:
    """The state components the tape stores, as indices into the state's components laid out
    leaf after leaf (``leaf_sizes``: components per leaf), in order: the kernels' row layout."""
    if config.tape_live is None:
        return tuple(range(sum(leaf_sizes)))
    columns, offset = [], 0
    for live, size in zip(config.tape_live, leaf_sizes):
        columns += [offset + j for j in live]
        offset += size
    return tuple(columns)


def _stored(config: Config, state: tuple) -> tuple:
    """What the tape keeps of a state (leaves [B, ...]): each leaf the VJP reads whole as it is,
    a partly read one as its read components [B, n], an unread one not at all."""
    if config.tape_live is None:
        return state
    out = []
    for leaf, live in zip(state, config.tape_live):
        size = math.prod(leaf.shape[1:])
        if len(live) == size:
            out.append(leaf)
        elif live:
            out.append(leaf.reshape(leaf.shape[0], size)[:, np.asarray(live)])
    return tuple(out)


def _unstored(config: Config, stored: tuple, zeros: tuple) -> tuple:
    """The state ``_stored`` kept, with zeros (never read by the VJP) where it kept nothing."""
    if config.tape_live is None:
        return stored
    kept, out = iter(stored), []
    for zero, live in zip(zeros, config.tape_live):
        size = math.prod(zero.shape[1:])
        if len(live) == size:
            out.append(next(kept))
        elif live:
            flat = zero.reshape(zero.shape[0], size).at[:, np.asarray(live)].set(next(kept))
            out.append(flat.reshape(zero.shape))
        else:
            out.append(zero)
    return tuple(out)


class Times(NamedTuple):
    """Internal (direction-normalised, increasing) times of a solve; arrays."""

    direction: jax.Array  # +1 or -1
    t_start: jax.Array  # scalar
    t_end: jax.Array  # scalar
    dt0: jax.Array  # scalar first step (fixed step size when not adaptive)
    ts: jax.Array  # [T] save times (or [1] holding t_end)
    rtol: jax.Array
    atol: jax.Array


# What a segment checkpoint holds: the part of the loop carry a step depends on.
LOOP = ("tprev", "tnext", "y", "f", "result")


class Tape(NamedTuple):
    """A ring of R rows (row = iteration mod R) and one checkpoint per segment."""

    # What ``_stored`` keeps of each iteration's start state and of its increments: leaves
    # [R, B, ...] (a partly read leaf [R, B, n]; none without Config.tape_state)
    y: tuple
    k: tuple  # leaves [R, TAPE_STAGES, B, ...]
    # Adaptive steps only (None for fixed steps, whose reverse pass computes an iteration's
    # times with _step.fixed_interval and its accepted lanes from num_accepted: ``fixed_row``).
    tprev: Optional[jax.Array]  # [R, B]
    tnext: Optional[jax.Array]
    accepted: Optional[jax.Array]  # [R, B] bool: an accepted step of a still-running lane
    checkpoints: dict  # LOOP keys, each leaf with a leading axis of segments


class Forward(NamedTuple):
    ys: tuple  # leaves [B, T, ...]
    num_accepted: jax.Array  # [B]
    num_rejected: jax.Array  # [B]
    result: jax.Array  # [B]
    save_iter: jax.Array  # [B, T]: iteration that produced each save, -1 if none
    num_iters: jax.Array  # scalar: iterations the loop ran
    tape: Optional[Tape]
    t_final: jax.Array  # [B]: internal time each lane reached


class _FixedScalars(NamedTuple):
    """What ``fixed_row`` reads (the kernels pass their own Scalars, which hold these names)."""

    t_start: jax.Array
    t_end: jax.Array
    t_end_floor: jax.Array
    dt0: jax.Array
    num_fixed: jax.Array


class _Limits(NamedTuple):
    """Loop-invariant scalars of a step, computed once per loop."""

    t_end_floor: jax.Array
    num_fixed_steps: Optional[jax.Array]


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def _batch(state: tuple) -> int:
    return state[0].shape[0]


def _limits(config: Config, times: Times) -> _Limits:
    fixed = None
    if not config.adaptive:
        # Opaque to XLA: with times known at trace time the step count is a constant, and XLA
        # turns a division by a constant into a product with its reciprocal, which rounds
        # differently (0.5 * (3 / 5) = 0.3, but 3 * (0.5 / 5) = 0.30000000000000004). The
        # forward's step ends (inside _isolated, where the count arrives as an operand) and the
        # reverse pass's recomputed ones (_step.fixed_interval) must divide alike.
        fixed = lax.optimization_barrier(_step.constant_num_steps(times.t_start, times.t_end, times.dt0))
    return _Limits(_step.end_clip_floor(times.t_end), fixed)


def _running(c, t_end):
    return (c["tprev"] < t_end) & (c["result"] == SUCCESSFUL)


def _attempt(config: Config, field, times: Times, limits: _Limits, c, n, *, isolated=True) -> _step.Attempt:
    """Iteration n's attempted step for every lane, from the carry entries named in LOOP.

    ``isolated=False``: the stages as one expression, for XLA to fuse whole, and the field at
    the step's end (FSAL) not evaluated: its k_7 and ``f`` are zeros, and the caller evaluates
    it (``_lean_forward``).
    """
    in_loop = n < config.rows  # True here; unknown to the compiler

    def stage_field(t, y):
        return _evaluate(field, (t, y), in_loop) if isolated else field(t, y)

    def end_field(t, y):
        return stage_field(t, y) if isolated else tuple(jnp.zeros_like(leaf) for leaf in y)

    def attempt(loop):
        return _step.attempt_step(
            stage_field, adaptive=config.adaptive, active=_running(loop, times.t_end), tprev=loop["tprev"],
            tnext=loop["tnext"], y=loop["y"], f=loop["f"], direction=times.direction, rtol=times.rtol,
            atol=times.atol, t_start=times.t_start, t_end=times.t_end, t_end_floor=limits.t_end_floor,
            num_fixed_steps=limits.num_fixed_steps, steps_done=n, end_field=end_field,
        )

    # One computation of its own on CPU, so that the forward loop and a segment's replay
    # compile the step alike: fused into each loop differently, a replayed adaptive trajectory
    # moved by up to 4e-11 (one-ulp stage differences, amplified by the error estimate).
    loop = {k: c[k] for k in LOOP}
    return _isolated(attempt, loop, in_loop) if isolated else attempt(loop)


def _advance(c, step: _step.Attempt) -> dict:
    """The LOOP entries after a step."""
    return dict(tprev=step.tprev, tnext=step.tnext, y=step.y, f=step.f,
                result=jnp.where(step.nonfinite, NONFINITE, c["result"]))


def _write_row(config: Config, tape: Tape, row, c, step: _step.Attempt) -> Tape:
    """Store what the reverse sweep reads of one iteration in ring row ``row``."""
    ks = [_stored(config, k) for k in step.ks[:TAPE_STAGES]]
    tape = tape._replace(
        y=tuple(buf.at[row].set(leaf) for buf, leaf in zip(tape.y, _stored(config, c["y"]))),
        k=tuple(buf.at[row].set(jnp.stack([k[i] for k in ks])) for i, buf in enumerate(tape.k)),
    )
    if tape.accepted is None:  # fixed steps: nothing else to store
        return tape
    return tape._replace(
        tprev=tape.tprev.at[row].set(c["tprev"]),
        tnext=tape.tnext.at[row].set(c["tnext"]),
        accepted=tape.accepted.at[row].set(step.accept),
    )


def fixed_row(k, n, num_accepted):
    """(tprev, tnext, accepted lanes) of fixed-step iteration ``n``, computed instead of
    stored; ``k`` holds t_start, t_end, t_end_floor, dt0 and num_fixed (both backends' scalars).

    All lanes share their times, and a lane accepts every iteration until the one where it
    failed (counted as accepted) or the loop ends: iteration n was accepted by exactly the
    lanes with ``n < num_accepted``. ``n >= 0`` too: under ``jax.vmap`` a batch element that
    has run out of iterations sweeps with n < 0."""
    tprev, tnext = _step.fixed_interval(n, k.num_fixed, k.t_start, k.t_end, k.t_end_floor, k.dt0)
    return tprev, tnext, (n >= 0) & (n < num_accepted)


def stores_rows(config: Config, with_tape: bool) -> bool:
    """Whether the forward writes anything per iteration besides saves: tape rows (the
    state, or an adaptive step's times and flags) or segment checkpoints."""
    return with_tape and (config.tape_state or config.adaptive or config.tape_rows < config.rows)


def _lean(config: Config, with_tape: bool) -> bool:
    """Whether ``forward`` runs ``_lean_forward`` (and ``backward`` its lean sweep)."""
    return not config.adaptive and not stores_rows(config, with_tape)


def forward(config: Config, field, times: Times, y0: tuple, *, with_tape: bool) -> Forward:
    """Integrate every lane; ``field(t [B], y) -> f`` takes internal times."""
    if _lean(config, with_tape):
        return _lean_forward(config, field, times, y0, with_tape=with_tape)
    B = _batch(y0)
    T = times.ts.shape[0]
    tdtype = times.t_start.dtype
    # Fixed steps put every lane at the same times: keep them as shared scalars, so a field
    # that depends on t evaluates that dependence once per stage rather than once per lane.
    t_start = _lane_times(config, times.t_start, B)
    t_end = times.t_end
    limits = _limits(config, times)

    # The field at the start point: the first step's FSAL stage (diffrax evaluates it in the
    # first step for every lane).
    f0 = field(t_start, y0)
    dt0 = _lane_times(config, times.dt0, B)
    tnext = jnp.minimum(t_start + dt0, t_end)

    ys = tuple(jnp.full((B, T) + y.shape[1:], jnp.inf, y.dtype) for y in y0)
    save_iter = jnp.full((B, T), -1, jnp.int32)
    zeros_b = jnp.zeros((B,), jnp.int32)
    carry = dict(
        tprev=t_start,
        tnext=tnext,
        y=y0,
        f=f0,
        num_accepted=zeros_b,
        num_rejected=zeros_b,
        result=zeros_b,
        save_index=zeros_b,
        ys=ys,
        save_iter=save_iter,
    )
    if not config.adaptive:
        # Shared times run on to t_end after a lane fails: keep each lane's own stop time.
        carry["t_final"] = jnp.broadcast_to(t_start, (B,))
    if with_tape:
        R = config.tape_rows
        segments = _schedule.num_segments(config.rows, R)
        spec = jax.ShapeDtypeStruct
        stored = _stored(config, y0)
        adaptive = config.adaptive
        carry["tape"] = _uninitialised.like(Tape(
            y=tuple(spec((R,) + y.shape, y.dtype) for y in stored),
            k=tuple(spec((R, TAPE_STAGES) + y.shape, y.dtype) for y in stored),
            tprev=spec((R, B), tdtype) if adaptive else None,
            tnext=spec((R, B), tdtype) if adaptive else None,
            accepted=spec((R, B), jnp.bool_) if adaptive else None,
            checkpoints=jax.tree_util.tree_map(
                lambda x: spec((segments,) + jnp.shape(x), jnp.result_type(x)), {k: carry[k] for k in LOOP}
            ),
        ), batched_like=y0)

    def keep_going(c):
        if not config.adaptive:
            # Shared times: the loop ends when they reach t_end. Lanes that failed early are
            # masked until then; skipping the per-lane reduction keeps the loop lean.
            return c["tprev"] < t_end
        return jnp.any(_running(c, t_end))

    def step(c, n, row):
        attempt = _attempt(config, field, times, limits, c, n)
        out = dict(c)
        out.update(_advance(c, attempt))
        out["num_accepted"] = c["num_accepted"] + attempt.accept
        out["num_rejected"] = c["num_rejected"] + attempt.reject
        if not config.adaptive:
            out["t_final"] = jnp.where(_running(c, t_end), attempt.tprev, c["t_final"])
        if config.save_ts:
            out["save_index"], out["ys"], out["save_iter"] = _save(
                c, n, attempt.accept, c["tprev"], c["tnext"], c["y"], attempt.ks, times.ts
            )
        if with_tape:
            out["tape"] = _write_row(config, c["tape"], row, c, attempt)
        return out

    def checkpoint(c, segment):
        tape = c["tape"]
        saved = jax.tree_util.tree_map(lambda buf, x: buf.at[segment].set(x), tape.checkpoints,
                                       {k: c[k] for k in LOOP})
        return {**c, "tape": tape._replace(checkpoints=saved)}

    # A ring that holds every row needs no checkpoints. Segments run in one flat loop: XLA
    # copies the whole tape into a while loop nested in another (the seed at 8,000 fixed steps:
    # jit(grad) 282 ms nested, 108 ms in one loop).
    segmented = with_tape and config.tape_rows < config.rows
    num_iters, c = _schedule.forward_loop(
        carry, rows=config.rows, tape_rows=config.tape_rows, keep_going=keep_going, step=step,
        checkpoint=checkpoint if segmented else None, flat=True,
    )
    result = jnp.where(_running(c, t_end), MAX_STEPS_REACHED, c["result"])
    if config.save_ts:
        # t0 == t1: the loop never runs and every save time equals t0 (diffrax
        # _save_if_t0_equals_t1).
        empty = times.t_start == t_end
        ys = tuple(jnp.where(empty, jnp.broadcast_to(y[:, None], s.shape), s) for y, s in zip(y0, c["ys"]))
    else:
        ys = tuple(y[:, None] for y in c["y"])
    return Forward(
        ys=ys,
        num_accepted=c["num_accepted"],
        num_rejected=c["num_rejected"],
        result=result,
        save_iter=c["save_iter"],
        num_iters=num_iters,
        tape=c.get("tape"),
        t_final=c["tprev"] if config.adaptive else c["t_final"],
    )


def _lean_forward(config: Config, field, times: Times, y0: tuple, *, with_tape: bool) -> Forward:
    """``forward`` for fixed steps that store nothing per iteration: what a solve without a
    gradient runs, and a gradient's forward when the field's VJP reads no state.

    Every lane shares its times, so the loop carries only the iteration, the state, its FSAL
    derivative and the iteration at which each lane failed: the times are computed from the
    iteration (``_step.fixed_interval``, bit for bit the carried ones), and a state that
    became non-finite is noticed at the start of the next iteration (the lane's outcome is the
    same: it stops with that state, its failing step counted as accepted). The step's stages
    then have one result, the next state, which XLA compiles into one loop fusion (no stage
    computed twice); the FSAL derivative is the field at that state, evaluated apart
    (``_evaluate``) from it in memory: about 10 XLA:CPU operations per step where ``forward``
    has ~38 (2-core VM, float32, ``python -m bench --quick``: the seed's forward, 2,250 lanes,
    800 steps, 3.4-4.7 -> 1.8-3.1 ms; Lorenz, 256 lanes, 1,000 steps, 10 saves, 6.2 -> 2.1 ms).
    A step in which a save falls runs the isolated step of ``forward`` in a conditional's
    branch: the interpolation needs its stages. Field evaluations: 1 + 6 per step, as
    ``forward``.
    """
    B = _batch(y0)
    T = times.ts.shape[0]
    limits = _limits(config, times)
    fixed = _FixedScalars(times.t_start, times.t_end, limits.t_end_floor, times.dt0, limits.num_fixed_steps)
    never = jnp.int32(config.rows)  # the failure iteration of a lane that has not failed

    def interval(n):
        return _step.fixed_interval(n, fixed.num_fixed, fixed.t_start, fixed.t_end, fixed.t_end_floor, fixed.dt0)

    def note_failures(n, tprev, tnext, y, failed_at, t_final):
        # Iteration n - 1 failed a lane if it left a non-finite state or step end (attempt_step's
        # ``nonfinite``; with shared times the end is each lane's). The lane stopped at the
        # start of iteration n, tprev (a scalar: per lane, XLA:CPU rounds this arithmetic
        # differently).
        new = (failed_at == never) & (n > 0) & ~(_step.all_finite(y) & jnp.isfinite(tnext))
        return jnp.where(new, n - 1, failed_at), jnp.where(new, tprev, t_final)

    def step(n, tprev, tnext, y, f, running, isolated):
        loop = dict(tprev=tprev, tnext=tnext, y=y, f=f, result=jnp.where(running, SUCCESSFUL, NONFINITE))
        return _attempt(config, field, times, limits, loop, n, isolated=isolated)

    def body(state):
        n, y, f, failed_at, t_final, saves = state
        tprev, tnext = interval(n)
        failed_at, t_final = note_failures(n, tprev, tnext, y, failed_at, t_final)
        running = failed_at == never

        def lean_step(y, f):
            # The FSAL value apart from the stages (in memory, once), at the next state: for a
            # running lane the step's end, and a stopped lane's is never used.
            y = step(n, tprev, tnext, y, f, running, isolated=False).y
            return y, _evaluate(field, (tnext, y), n < config.rows)

        if not config.save_ts:
            return (n + 1, *lean_step(y, f), failed_at, t_final, saves)

        def with_saves(operand):
            y, f, (pointer, save_index, ys, save_iter) = operand
            attempt = step(n, tprev, tnext, y, f, running, isolated=True)
            save_index, ys, save_iter = _save(dict(save_index=save_index, ys=ys, save_iter=save_iter), n,
                                              attempt.accept, tprev, tnext, y, attempt.ks, times.ts)
            pointer = lax.while_loop(lambda p: due(p, tnext), lambda p: p + 1, pointer)
            return attempt.y, attempt.f, (pointer, save_index, ys, save_iter)

        def without_saves(operand):
            y, f, saves = operand
            return (*lean_step(y, f), saves)

        # The running lanes' next save (a failed lane's stops where it failed).
        y, f, saves = lax.cond(due(saves[0], tnext), with_saves, without_saves, (y, f, saves))
        return n + 1, y, f, failed_at, t_final, saves

    def due(pointer, tnext):
        return (pointer < T) & (times.ts[jnp.minimum(pointer, T - 1)] <= tnext)

    def go(state):
        n = state[0]
        return (n < config.rows) & (interval(n)[0] < times.t_end)

    saves = ()
    if config.save_ts:
        zeros_b = jnp.zeros((B,), jnp.int32)
        saves = (jnp.int32(0), zeros_b, tuple(jnp.full((B, T) + y.shape[1:], jnp.inf, y.dtype) for y in y0),
                 jnp.full((B, T), -1, jnp.int32))
    init = (jnp.int32(0), y0, field(times.t_start, y0), jnp.full((B,), never), jnp.zeros((B,), times.t_start.dtype),
            saves)
    n, y, _, failed_at, t_final, saves = lax.while_loop(go, body, init)
    t_reached, t_next = interval(n)
    failed_at, t_final = note_failures(n, t_reached, t_next, y, failed_at, t_final)
    failed = failed_at < never
    num_accepted = jnp.where(failed, failed_at + 1, n)
    running_at_end = t_reached < times.t_end
    result = jnp.where(failed, NONFINITE, jnp.where(running_at_end, MAX_STEPS_REACHED, SUCCESSFUL)).astype(jnp.int32)
    if config.save_ts:
        _, _, ys, save_iter = saves
        empty = times.t_start == times.t_end  # the loop never ran: every save is y0 (see forward)
        ys = tuple(jnp.where(empty, jnp.broadcast_to(a[:, None], s.shape), s) for a, s in zip(y0, ys))
    else:
        ys, save_iter = tuple(a[:, None] for a in y), jnp.full((B, T), -1, jnp.int32)
    return Forward(
        ys=ys,
        num_accepted=num_accepted,
        num_rejected=jnp.zeros((B,), jnp.int32),
        result=result,
        save_iter=save_iter,
        num_iters=n,
        tape=None,  # nothing per iteration: the lean sweep reads no tape
        t_final=jnp.where(failed, t_final, t_reached),
    )


def _isolated(fn, operand, always_true):
    """``fn(operand)``, compiled on XLA:CPU as a computation of its own and computed once into
    memory.

    XLA:CPU fuses cheap elementwise producers into every consumer, so without a boundary the
    whole stage chain of a step is recomputed inside each consumer (new state, FSAL value,
    error estimate, each tape row): measured 3x slower on the seed workload. A conditional is
    a fusion boundary; its never-taken branch (zeros) differs from the taken one so that it is
    not simplified away. On GPUs a conditional costs a host round trip, so there it is skipped.
    """
    if jax.default_backend() != "cpu":
        return fn(operand)
    shapes = jax.eval_shape(fn, operand)
    zeros = lambda _: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
    return lax.cond(always_true, fn, zeros, operand)


# Primitives that XLA:CPU evaluates with many instructions per element (polynomial
# approximations): a field that uses one is left to run in the main computation, where XLA
# splits its large elementwise loops over the CPU's threads (see ``_evaluate``).
_COSTLY = frozenset({
    "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "tanh", "asinh", "acosh",
    "atanh", "exp", "exp2", "log", "log1p", "expm1", "logistic", "pow", "erf", "erfc", "erf_inv",
    "lgamma", "digamma", "igamma", "cbrt",
})


def _uses_costly_primitive(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _COSTLY and any(getattr(v.aval, "size", 1) > 1 for v in eqn.outvars):
            return True  # per lane (on a shared scalar time it costs nothing)
        if any(_uses_costly_primitive(sub) for sub in _liveness.sub_jaxprs(eqn.params)):
            return True
    return False


def _evaluate(fn, args, always_true):
    """``fn(*args)`` (a field or its VJP at one stage), computed once into memory on XLA:CPU.

    Without a boundary XLA:CPU recomputes the field inside every consumer (see ``_isolated``).
    A field of cheap arithmetic runs as a conditional's branch of its own: its inputs are
    materialised and it writes its outputs (README example, Lorenz: jit(grad) 30 -> 26 ms,
    against computing it outside and copying every output through an identity branch). A field
    with a costly primitive (sin, exp, ...) is computed outside and copied through, because XLA
    runs a branch on one thread and splits the main computation's loops over several (seed-nl:
    117 ms copied, 146 ms in a branch)."""
    if jax.default_backend() != "cpu":
        return fn(*args)
    if _uses_costly_primitive(jax.make_jaxpr(fn)(*args).jaxpr):
        return _isolated(lambda v: v, fn(*args), always_true)
    return _isolated(lambda a: fn(*a), args, always_true)


def _lane_times(config: Config, t, B: int):
    """A shared scalar time as the driver carries it: per lane [B] when adaptive, else []."""
    return jnp.full((B,), t, t.dtype) if config.adaptive else t


def _save(c, n, accept, tprev, tnext, y, ks, ts):
    """Save every ts[j] not yet saved with ts[j] <= tnext, interpolated inside this step
    (diffrax _integrate.py ``save_ts_impl``); several saves may fall in one step."""
    B = accept.shape[0]
    T = ts.shape[0]
    lanes = jnp.arange(B)

    def pending(s):
        index, _, _ = s
        safe = jnp.minimum(index, T - 1)
        return accept & (index < T) & (ts[safe] <= tnext)

    def save_one(s):
        index, ys, save_iter = s
        mask = pending(s)
        safe = jnp.minimum(index, T - 1)
        theta = _step.linear_rescale(tprev, ts[safe], tnext)
        values = _step.interpolate(theta, y, ks)
        ys = tuple(
            buf.at[lanes, safe].set(jnp.where(_step.lane(mask, v), v, buf[lanes, safe]))
            for buf, v in zip(ys, values)
        )
        save_iter = save_iter.at[lanes, safe].set(jnp.where(mask, n, save_iter[lanes, safe]))
        return index + mask, ys, save_iter

    return lax.while_loop(
        lambda s: jnp.any(pending(s)), save_one, (c["save_index"], c["ys"], c["save_iter"])
    )


def backward(config: Config, field, field_vjp, times: Times, y0: tuple, fwd: Forward, ys_bar: tuple,
             args_bar):
    """The reverse sweep over every iteration the forward ran. Returns (y0_bar, args_bar).

    Iterations are visited in ``_schedule.reverse_loop``'s order: the last R iterations from
    the ring, the earlier ones segment by segment after re-running them from a checkpoint
    with ``field``.
    ``field_vjp(t [B], y, f_bar) -> (y_bar, args_bar)``; ``args_bar`` comes in as zeros shaped
    like the differentiable arguments and accumulates every stage's contribution.
    """
    B = _batch(y0)
    lanes = jnp.arange(B)
    limits = _limits(config, times)
    zeros = tuple(jnp.zeros_like(y) for y in y0)
    if config.save_ts:
        y_bar = zeros
        pointer = jnp.sum(fwd.save_iter >= 0, axis=1).astype(jnp.int32) - 1
    else:
        y_bar = tuple(g[:, 0] for g in ys_bar)
        pointer = jnp.full((B,), -1, jnp.int32)
    t_start = _lane_times(config, times.t_start, B)
    fixed_scalars = None if config.adaptive else _FixedScalars(
        times.t_start, times.t_end, limits.t_end_floor, times.dt0, limits.num_fixed_steps)

    def due_iteration(p):
        """The iteration that produced save p of each lane (-1 when p < 0: none is left)."""
        return jnp.where(p >= 0, fwd.save_iter[lanes, jnp.maximum(p, 0)], -1)

    def inject_saves(n, tprev, tnext, pointer, due):
        """Cotangents of outputs saved in iteration n, walking the save pointer down. One
        save per step is the common case: it is taken unconditionally, further ones in a loop."""

        def pending(p, due):
            # p >= 0 too: under jax.vmap a group that has run out of iterations sweeps with
            # n < 0, which must not match the -1 of "no save left".
            return (p >= 0) & (due == n)

        def one(p, due):
            mask = pending(p, due)
            safe = jnp.maximum(p, 0)
            theta = _step.linear_rescale(tprev, times.ts[safe], tnext)
            g = tuple(jnp.where(_step.lane(mask, b[lanes, safe]), b[lanes, safe], 0) for b in ys_bar)
            p = p - mask
            return p, jnp.where(mask, due_iteration(p), due), theta, g

        if not config.save_ts:
            k_bars = tuple(zeros for _ in range(NUM_STAGES))
            return pointer, due, zeros, k_bars
        pointer, due, theta, g = one(pointer, due)
        y0_bar, k_bars = _step.interpolate_vjp(theta, g)

        def more(s):
            p, d, y0_bar, k_bars = s
            p, d, theta, g = one(p, d)
            y0_bar, k_bars = _step.interpolate_vjp(theta, g, y0_bar, k_bars)
            return p, d, y0_bar, k_bars

        return lax.while_loop(lambda s: jnp.any(pending(s[0], s[1])), more, (pointer, due, y0_bar, k_bars))

    def replay(c, segment, start, count):
        tape = c[0]
        loop = jax.tree_util.tree_map(lambda buf: buf[segment], tape.checkpoints)

        def one(i, state):
            loop, tape = state
            attempt = _attempt(config, field, times, limits, loop, start + i)
            return _advance(loop, attempt), _write_row(config, tape, i, loop, attempt)

        _, tape = lax.fori_loop(jnp.int32(0), count, one, (loop, tape))
        return (tape,) + c[1:]

    def sweep(c, n, row):
        tape, y_bar, f_bar, args_bar, pointer, due = c
        in_loop = n >= 0

        def stage_vjp(t, y, f_bar):
            return _evaluate(field_vjp, (t, y, f_bar), in_loop)

        if config.adaptive:
            mask = tape.accepted[row]
            tprev, tnext = tape.tprev[row], tape.tnext[row]
        else:
            tprev, tnext, mask = fixed_row(fixed_scalars, n, fwd.num_accepted)
        if config.tape_state:
            y_start = _unstored(config, tuple(buf[row] for buf in tape.y), zeros)
            ks = tuple(_unstored(config, tuple(buf[row, s] for buf in tape.k), zeros) for s in range(TAPE_STAGES))
        else:  # the field's VJP does not read the stage inputs built from these
            y_start, ks = zeros, (zeros,) * TAPE_STAGES
        pointer, due, y0_bar_saves, k_bars = inject_saves(n, tprev, tnext, pointer, due)
        control = times.direction * (tnext - tprev)
        y0_bar, f0_bar, step_args_bar = _step.tsit5_step_vjp(
            stage_vjp, tprev, tnext, y_start, ks, control, mask, y_bar, f_bar, y0_bar_saves, k_bars
        )
        y_bar = _step.lane_where(mask, y0_bar, y_bar)
        f_bar = _step.lane_where(mask, f0_bar, f_bar)
        args_bar = jax.tree_util.tree_map(jnp.add, args_bar, step_args_bar)
        return tape, y_bar, f_bar, args_bar, pointer, due

    def around_replays(run, num_segments, c):
        # The forward's tape is an input of this computation: a loop that wrote into it would
        # make XLA copy all of it first, on every call, replay or not (3x the backward time of
        # a fixed-step solve that fits). Replays get a ring of their own, made only when some
        # segment is replayed.
        def replays(rest):
            ring = _uninitialised.like(fwd.tape._replace(checkpoints=None), batched_like=y0)
            return run((ring._replace(checkpoints=fwd.tape.checkpoints),) + rest)[1:]

        return (c[0],) + lax.cond(num_segments > 0, replays, lambda rest: rest, c[1:])

    def lean_sweep(i, c, every_lane=False):
        # _lean_forward's gradient: no rows, no replays. Each iteration's FSAL cotangent is
        # applied at once to the field at the step's start (the field's VJP reads no state, so
        # the point is the same as where the previous step or the initial evaluation computed
        # it), and without saves the field at the step's end gets no VJP of its own. The
        # iteration's only results are then the cotangents of the state (and of the
        # arguments): XLA fuses the step's whole VJP. An iteration in which some lane saved
        # runs the isolated sweep (its saves' cotangents) in a conditional's branch.
        # ``every_lane``: every lane accepted this iteration, so no cotangent is masked (a
        # constant mask, which XLA folds away: 8 of the seed's 63 operations per lane-step).
        n = fwd.num_iters - 1 - i
        tprev, tnext, mask = fixed_row(fixed_scalars, n, fwd.num_accepted)
        if every_lane:
            mask = jnp.ones((), bool)

        def without_saves(c):
            tape, y_bar, f_bar, args_bar, pointer, due = c
            y0_bar, f0_bar, step_args_bar = _step.tsit5_step_vjp(
                field_vjp, tprev, tnext, zeros, (zeros,) * TAPE_STAGES, times.direction * (tnext - tprev), mask,
                y_bar, None, None, None)
            return tape, _step.lane_where(mask, y0_bar, y_bar), f0_bar, _add(args_bar, step_args_bar), pointer, due

        def with_saves(c):
            return sweep(c, n, None)

        c = lax.cond(saved_in[n], with_saves, without_saves, c) if config.save_ts else without_saves(c)
        tape, y_bar, f_bar, args_bar, pointer, due = c
        f0_y_bar, f0_args_bar = field_vjp(tprev, zeros, _step.lane_where(mask, f_bar, zeros))  # zeros: see above
        return tape, _step.lane_where(mask, _add(y_bar, f0_y_bar), y_bar), zeros, _add(args_bar, f0_args_bar), pointer, due

    carry = (fwd.tape, y_bar, zeros, args_bar, pointer, due_iteration(pointer))
    if _lean(config, True):
        if config.save_ts:  # whether some lane saved in iteration n
            saved = jnp.where(fwd.save_iter >= 0, fwd.save_iter, config.rows).ravel()  # -1: none
            saved_in = jnp.zeros((config.rows,), bool).at[saved].set(True, mode="drop")
        # Iterations below the fewest any lane accepted were accepted by every lane (all of
        # them when no lane failed): those run unmasked, after the others.
        every_lane_from = fwd.num_iters - jnp.min(fwd.num_accepted)
        carry = lax.fori_loop(jnp.int32(0), every_lane_from, lean_sweep, carry)
        _, y_bar, _, args_bar, _, _ = lax.fori_loop(
            every_lane_from, fwd.num_iters, functools.partial(lean_sweep, every_lane=True), carry)
    else:
        _, y_bar, f_bar, args_bar, _, _ = _schedule.reverse_loop(
            fwd.num_iters, config.tape_rows, carry, replay=replay, sweep=sweep, around_replays=around_replays,
        )
        # The first step's FSAL stage: the field at the initial point.
        start_y_bar, start_args_bar = field_vjp(t_start, y0, f_bar)
        y_bar = _add(y_bar, start_y_bar)
        args_bar = _add(args_bar, start_args_bar)
    if config.save_ts:
        empty = times.t_start == times.t_end
        y_bar = tuple(a + jnp.where(empty, jnp.sum(g, axis=1), 0) for a, g in zip(y_bar, ys_bar))
    return y_bar, args_bar
