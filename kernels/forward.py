"""The fused forward kernel: the whole time loop of one lane tile in one program.

Owns: looping and memory movement of the forward pass on a GPU. Each program loads its tile of
lanes, runs ``fusedrk._step.attempt_step`` until every lane of the tile is done (or the row
limit is reached), writes saved outputs row by row, and, when a gradient will be taken, writes
every iteration's start state, k_1..k_6 and (adaptive steps only) interval and accepted flag
to a ring of tape rows in HBM at ``ring[n mod R, s, tile]`` (an adaptive lane only while it
runs: ``write_row``), with a checkpoint of the loop
carry at the start of every segment of R iterations (the schedule is ``fusedrk._schedule``).
Without a gradient it allocates and writes no tape. Fixed steps keep the tile's times as
scalars, so the loop's condition and the save walk need no reduction over the tile.

Must not: contain step algebra (``fusedrk/_step.py``) or anything Triton-specific beyond the
loads and stores (``_triton.py``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from fusedrk import _schedule, _step
from fusedrk._reference import MAX_STEPS_REACHED, NONFINITE, SUCCESSFUL, TAPE_STAGES, Config, Times, tape_columns

from . import _triton
from ._problem import TileProblem, pad_lanes

# save_iter of a save time a lane never reached: larger than any iteration.
NEVER_SAVED = 2**31 - 1


class KernelTape(NamedTuple):
    """A ring of R rows (row = iteration mod R) and one checkpoint per segment (``_schedule``)."""

    # [R, (1 + TAPE_STAGES) * C, Bp]: start state then k_1..k_6, each as the C components the
    # field's VJP reads (``_reference.tape_columns``); a [1, 1, Bp] placeholder, never written
    # or read, when it reads none (Config.tape_state false).
    states: jax.Array
    # Adaptive steps only; with fixed steps [1, 2, Bp] and [1, Bp] placeholders, never written
    # or read (the reverse kernel computes times and accepted lanes: _reference.fixed_row).
    times: jax.Array  # [R, 2, Bp]: tprev, tnext
    accepted: jax.Array  # [R, Bp] int32
    checkpoint_states: jax.Array  # [segments, 2 * L, Bp]: state then FSAL derivative, per leaf
    checkpoint_times: jax.Array  # [segments, 2, Bp]: tprev, tnext ([1, 2, Bp] with fixed steps)
    checkpoint_result: jax.Array  # [segments, Bp] int32

    @property
    def ring(self):
        return self.states, self.times, self.accepted

    @property
    def checkpoints(self):
        return self.checkpoint_states, self.checkpoint_times, self.checkpoint_result


class KernelForward(NamedTuple):
    ys: tuple  # leaves [B, T, *shape]
    num_accepted: jax.Array  # [B]
    num_rejected: jax.Array
    result: jax.Array
    save_iter: jax.Array  # [T, Bp]: iteration of each save, NEVER_SAVED if none
    iterations: jax.Array  # [num_tiles]: iterations each tile ran
    tape: Optional[KernelTape]
    t_final: jax.Array  # [B]: internal time each lane reached


class Scalars(NamedTuple):
    """Scalars every kernel program needs, passed as 0-d arrays (Triton takes no captured
    constants) and read as values inside the kernel."""

    t_start: jax.Array
    t_end: jax.Array
    t_end_floor: jax.Array
    dt0: jax.Array
    direction: jax.Array
    rtol: jax.Array
    atol: jax.Array
    num_fixed: jax.Array

    @classmethod
    def read(cls, refs):
        return cls(*(r[...] for r in refs))


def time_scalars(times: Times, config: Config, state_dtype) -> Scalars:
    tdtype = times.t_start.dtype
    num_fixed = (
        jnp.zeros((), jnp.int32) if config.adaptive
        else _step.constant_num_steps(times.t_start, times.t_end, times.dt0)
    )
    return Scalars(
        times.t_start,
        times.t_end,
        _step.end_clip_floor(times.t_end),
        times.dt0,
        times.direction.astype(tdtype),
        jnp.asarray(times.rtol, state_dtype),
        jnp.asarray(times.atol, state_dtype),
        num_fixed,
    )


def running(k: Scalars, tprev, result):
    """Lanes still integrating: before the end and not failed."""
    return (tprev < k.t_end) & (result == SUCCESSFUL)


def attempt(config: Config, field, k: Scalars, n, tprev, tnext, y, f, result) -> _step.Attempt:
    """Iteration n's attempted step for a tile; the forward loop and the reverse kernel's
    replay of a segment call exactly this."""
    return _step.attempt_step(
        field, adaptive=config.adaptive, active=running(k, tprev, result), tprev=tprev, tnext=tnext,
        y=y, f=f, direction=k.direction, rtol=k.rtol, atol=k.atol, t_start=k.t_start, t_end=k.t_end,
        t_end_floor=k.t_end_floor, num_fixed_steps=k.num_fixed, steps_done=n,
    )


def tape_shapes(config: Config, L: int, stored: int, Bp: int, segments: int, dtype, tdtype) -> list:
    """The ShapeDtypeStructs of a KernelTape's fields (``_solve.tape_bytes`` counts them), for
    L state components of which the ring stores ``stored`` (``_reference.tape_columns``)."""
    R = config.tape_rows
    adaptive = config.adaptive
    spec = jax.ShapeDtypeStruct
    return [
        spec((R, (1 + TAPE_STAGES) * stored, Bp) if stored else (1, 1, Bp), dtype),
        spec((R if adaptive else 1, 2, Bp), tdtype),
        spec((R if adaptive else 1, Bp), jnp.int32),
        spec((segments, 2 * L, Bp), dtype),
        spec((segments if adaptive else 1, 2, Bp), tdtype),
        spec((segments, Bp), jnp.int32),
    ]


# Whether a finished adaptive lane stops writing tape rows (``write_row``; the reverse kernel's
# ``load_row`` follows it). Unmeasured on a GPU so far: it costs registers in the adaptive
# kernels (deviceless H100 compile: bench/README.md, "Finished adaptive lanes write no tape
# rows"), and ``bench/gpu_check.py`` times both ways. Fixed steps are unaffected (identical
# PTX). Read when each kernel is traced: a forward and its reverse must be traced with the same
# setting (one ``jit`` of the gradient, as gpu_check does).
SKIP_FINISHED_ROWS = True


def skips_finished_rows(config: Config) -> bool:
    """Whether a finished lane of this solve writes no more rows (read when tracing)."""
    return config.adaptive and SKIP_FINISHED_ROWS


def write_row(config: Config, ring_refs, row, lanes, tprev, tnext, y, step: _step.Attempt, columns: tuple,
              interpret: bool) -> None:
    """Store what the reverse sweep reads of one iteration in ring row ``row``.

    With adaptive steps only the lanes running at the iteration's start write (those that
    accepted or rejected its step): a lane that has finished (or failed) never writes again,
    so a tile whose lanes finish apart stops moving their bytes. A lane runs from iteration 0
    for as many iterations as it accepted or rejected steps, so the reverse kernel knows which
    of its rows were written (``reverse.load_row``). Fixed-step lanes all run every iteration:
    every lane writes.
    Of the state and each increment, only the components in ``columns`` are stored (those the
    field's VJP reads: ``_reference.tape_columns``), the j-th of them at s * len(columns) + j.
    """
    states_ref, times_ref, accepted_ref = ring_refs
    written = step.accept | step.reject if skips_finished_rows(config) else None
    for s, state in enumerate((y,) + step.ks[:TAPE_STAGES]):
        for j, component in enumerate(columns):
            _triton.store_lanes(states_ref.at[row, jnp.int32(s * len(columns) + j), lanes], state[component],
                                written, interpret)
    if config.adaptive:
        _triton.store_lanes(times_ref.at[row, jnp.int32(0), lanes], tprev, written, interpret)
        _triton.store_lanes(times_ref.at[row, jnp.int32(1), lanes], tnext, written, interpret)
        _triton.store_lanes(accepted_ref.at[row, lanes], step.accept.astype(jnp.int32), written, interpret)


def write_checkpoint(config: Config, refs, segment, lanes, tprev, tnext, y, f, result) -> None:
    states_ref, times_ref, result_ref = refs
    for index, leaf in enumerate(y + f):
        states_ref[segment, jnp.int32(index), lanes] = leaf
    if config.adaptive:
        times_ref[segment, jnp.int32(0), lanes] = tprev
        times_ref[segment, jnp.int32(1), lanes] = tnext
    result_ref[segment, lanes] = result


def read_checkpoint(config: Config, k: "Scalars", refs, segment, start, lanes, L):
    """(tprev, tnext, y, f, result) stored at the start of ``segment`` (iteration ``start``);
    fixed steps' shared times are computed."""
    states_ref, times_ref, result_ref = refs
    leaves = tuple(states_ref[segment, jnp.int32(index), lanes] for index in range(2 * L))
    if config.adaptive:
        tprev, tnext = times_ref[segment, jnp.int32(0), lanes], times_ref[segment, jnp.int32(1), lanes]
    else:
        tprev, tnext = _step.fixed_interval(start, k.num_fixed, k.t_start, k.t_end, k.t_end_floor, k.dt0)
    return tprev, tnext, leaves[:L], leaves[L:], result_ref[segment, lanes]


def forward(config: Config, problem: TileProblem, times: Times, y0: tuple, diff: list, nondiff: list,
            *, with_tape: bool, interpret: bool) -> KernelForward:
    B = y0[0].shape[0]
    tdtype = times.t_start.dtype
    tiles = problem.on_tiles(y0, diff, nondiff, tdtype)
    launch = _triton.choose_launch(B, tiles.has_blocks, interpret=interpret)
    TB = launch.lane_tile
    Bp = _triton.padded_batch(B, tiles.has_blocks, interpret=interpret)
    num_tiles = Bp // TB
    T = times.ts.shape[0]
    R = config.tape_rows
    segments = _schedule.num_segments(config.rows, R)
    dtype = y0[0].dtype
    components = tiles.components(y0)  # the kernels see one [B] array per state component
    L = len(components)
    columns = tape_columns(config, tiles.leaf_sizes)  # the components each tape row stores
    arg_inputs, arg_axes = tiles.arg_inputs(diff, nondiff)
    y0p, argsp = pad_lanes(Bp, (components, [0] * L), (arg_inputs, arg_axes))
    inputs = [*y0p, *argsp, times.ts, *time_scalars(times, config, dtype)]

    out_shape = [jax.ShapeDtypeStruct((T, Bp), dtype) for _ in range(L)]
    out_shape += [jax.ShapeDtypeStruct((T, Bp), jnp.int32)]  # save_iter
    out_shape += [jax.ShapeDtypeStruct((Bp,), jnp.int32) for _ in range(3)]  # accepted, rejected, result
    out_shape += [jax.ShapeDtypeStruct((num_tiles,), jnp.int32)]  # iterations per tile
    out_shape += [jax.ShapeDtypeStruct((Bp,), tdtype)]  # time each lane reached
    if with_tape:
        out_shape += tape_shapes(config, L, len(columns), Bp, segments, dtype, tdtype)

    def kernel(*refs):
        ins, outs = refs[: len(inputs)], refs[len(inputs):]
        y_refs, rest = ins[:L], ins[L:]
        arg_refs, rest = rest[: len(argsp)], rest[len(argsp):]
        ts_ref, k = rest[0], Scalars.read(rest[1:])
        ys_refs, save_iter_ref = outs[:L], outs[L]
        acc_ref, rej_ref, result_ref, iters_ref, t_final_ref = outs[L + 1: L + 6]
        ring_refs, checkpoint_refs = outs[L + 6: L + 9], outs[L + 9:]

        lanes = _triton.lane_slice(launch)
        y = tuple(r[lanes] for r in y_refs)
        d_args, n_args = tiles.load_args(arg_refs, lanes)

        def field(t, state):  # internal (increasing) time in, the user's time to the field
            return tiles.field(k.direction * t, state, d_args, n_args)

        def init_row(j, _):
            for r in ys_refs:
                r[j, lanes] = jnp.full((TB,), jnp.inf, dtype)
            save_iter_ref[j, lanes] = jnp.full((TB,), NEVER_SAVED, jnp.int32)
            return _

        lax.fori_loop(0, T, init_row, 0)
        # Fixed steps: every lane of the tile at the same times, kept as scalars (the loop's
        # condition and the save schedule are then scalar too: no reduction over the tile).
        tprev = jnp.full((TB,), k.t_start, tdtype) if config.adaptive else k.t_start
        tnext = jnp.minimum(tprev + k.dt0, k.t_end)
        zeros_i = jnp.zeros((TB,), jnp.int32)
        carry = dict(tprev=tprev, tnext=tnext, y=y, f=field(tprev, y), acc=zeros_i, rej=zeros_i,
                     result=zeros_i, save_index=zeros_i, first_unsaved=jnp.int32(0))
        if not config.adaptive:  # shared times run on after a lane fails: its own stop time
            carry["t_final"] = jnp.full((TB,), k.t_start, tdtype)

        def keep_going(c):
            if not config.adaptive:
                return c["tprev"] < k.t_end
            return _triton.any_lane(running(k, c["tprev"], c["result"]))

        def step(c, n, row):
            tprev, tnext, y = c["tprev"], c["tnext"], c["y"]
            attempted = attempt(config, field, k, n, tprev, tnext, y, c["f"], c["result"])
            out = dict(c, tprev=attempted.tprev, tnext=attempted.tnext, y=attempted.y, f=attempted.f,
                       acc=c["acc"] + attempted.accept.astype(jnp.int32),
                       rej=c["rej"] + attempted.reject.astype(jnp.int32),
                       result=jnp.where(attempted.nonfinite, NONFINITE, c["result"]))
            if not config.adaptive:
                out["t_final"] = jnp.where(running(k, tprev, c["result"]), attempted.tprev, c["t_final"])
            if config.save_ts:
                out["save_index"], out["first_unsaved"] = _save_rows(
                    ts_ref, ys_refs, save_iter_ref, lanes, T, n, attempted.accept, tprev, tnext, y,
                    attempted.ks, c["save_index"], c["first_unsaved"],
                )
            if with_tape:
                write_row(config, ring_refs, row, lanes, tprev, tnext, y, attempted, columns, interpret)
            return out

        def checkpoint(c, segment):
            write_checkpoint(config, checkpoint_refs, segment, lanes, c["tprev"], c["tnext"], c["y"], c["f"],
                             c["result"])
            return c

        n, c = _schedule.forward_loop(carry, rows=config.rows, tape_rows=R, keep_going=keep_going,
                                      step=step, checkpoint=checkpoint if with_tape else None)
        tprev, y_final, acc, rej, result = c["tprev"], c["y"], c["acc"], c["rej"], c["result"]
        result = jnp.where(running(k, tprev, result), MAX_STEPS_REACHED, result)
        if config.save_ts:
            # t0 == t1: no iteration ran and every save time equals t0.
            def fill(j, _):
                for r, leaf in zip(ys_refs, y):
                    r[j, lanes] = leaf
                return _

            lax.fori_loop(jnp.int32(0), _triton.count_if(k.t_start == k.t_end, T), fill, 0)
        else:
            for r, leaf in zip(ys_refs, y_final):
                r[jnp.int32(0), lanes] = leaf
        acc_ref[lanes] = acc
        rej_ref[lanes] = rej
        result_ref[lanes] = result
        t_final_ref[lanes] = tprev if config.adaptive else c["t_final"]
        iters_ref[_triton.program_index()] = n

    out = _triton.call(kernel, inputs, out_shape, launch, num_tiles=num_tiles, interpret=interpret,
                       name="fusedrk_forward")
    ys = tiles.join([o[:, :B].T for o in out[:L]], (B, T))
    save_iter, acc, rej, result, iters, t_final = out[L: L + 6]
    tape = KernelTape(*out[L + 6:]) if with_tape else None
    return KernelForward(ys, acc[:B], rej[:B], result[:B], save_iter, iters, tape, t_final[:B])


def _save_rows(ts_ref, ys_refs, save_iter_ref, lanes, T, n, accept, tprev, tnext, y, ks, save_index,
               first_unsaved):
    """Write every save time that falls in this step, for each lane that accepted it.

    Rows are shared by the tile: walk rows upwards from the lowest row some lane has not
    saved, while some accepting lane's step reaches that row's time (diffrax saves ts[j] in the
    first accepted step ending at or after it). Each lane writes only its own pending rows.
    With fixed steps (scalar ``tnext``) every accepting lane saves the same rows: the walk's
    condition is scalar, and it ends at the lowest row left to save.
    """
    last = T - 1
    shared = jnp.ndim(tnext) == 0

    def cond(s):
        j, _ = s
        reached = ts_ref[jnp.minimum(j, last)] <= tnext
        return (j < T) & (reached if shared else _triton.any_lane(accept & reached))

    def body(s):
        j, index = s
        t_save = ts_ref[j]
        mask = accept & (j >= index) & (t_save <= tnext)
        values = _step.interpolate(_step.linear_rescale(tprev, t_save, tnext), y, ks)
        for r, v in zip(ys_refs, values):
            r[j, lanes] = jnp.where(mask, v, r[j, lanes])
        save_iter_ref[j, lanes] = jnp.where(mask, n, save_iter_ref[j, lanes])
        return j + 1, jnp.where(mask, j + 1, index)

    stop, save_index = lax.while_loop(cond, body, (first_unsaved, save_index))
    return save_index, stop if shared else jnp.min(save_index)
