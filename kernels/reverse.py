"""The fused reverse kernel: one backwards walk over a tile's tape, no step re-run.

Owns: looping and memory movement of the backward pass on a GPU. Each program walks its
tile's iterations n = N-1 .. 0 in ``fusedrk._schedule.reverse_loop``'s order (the last R iterations
from the ring; each earlier one after re-running it once from a checkpoint into the ring),
injects the cotangents of outputs saved in iteration n, and calls
``fusedrk._step.tsit5_step_vjp`` on the stored start state and increments (masked to accepted
steps; with fixed steps the interval and the accepted lanes are computed from n:
``fusedrk._reference.fixed_row``). The walk is software pipelined: each step first issues the
loads of the row the walk visits next (``load_row``), which then travel while the step's VJP
computes (a program of a small batch has few warps to hide a load's latency behind; Triton's
own pipelining, ``num_stages=2``, left these loops unchanged: same PTX, deviceless compile of
seed-nl, 2026-12-07). Outputs: cotangents of y0, of per-lane arguments ([B]) and per-tile partial
sums of shared arguments' cotangents (accumulated per lane during the walk, summed over the
tile once at its end, and over tiles outside).

The ring is an input aliased to an output (the replay rewrites it in place). Inside a
differentiated ``jit`` it is a dead residual and XLA reuses its buffer; if it arrives as a
non-donated argument (a ``jax.vjp`` pullback called outside the ``jit`` of its forward), XLA
copies it first, so the ring briefly takes twice its memory.

Must not: contain step algebra or Triton specifics beyond loads and stores.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from fusedrk import _schedule, _step
from fusedrk._reference import NONFINITE, TAPE_STAGES, Config, Times, fixed_row, tape_columns
from fusedrk._tableau import NUM_STAGES

from . import _triton
from ._problem import TileProblem, pad_lanes
from .forward import KernelForward, Scalars, attempt, read_checkpoint, skips_finished_rows, time_scalars, write_row

# Whether the walk prefetches the next row (see the module's docstring). Unmeasured on a GPU
# so far: it costs registers (deviceless H100 compile, reverse kernel, 2026-12-07: seed-nl
# float32 48 -> 56, Lorenz float64 adaptive 198 -> 238, no spills; the float64 adaptive test
# oscillator 154 -> 168 with 44 B of spill stores), and ``bench/gpu_check.py`` times both ways.
PIPELINE = True


def backward(config: Config, problem: TileProblem, times: Times, y0: tuple, diff: list, nondiff: list,
             fwd: KernelForward, ys_bar: tuple, *, interpret: bool):
    """Returns (y0_bar, diff_bar) shaped like y0 and diff."""
    B = y0[0].shape[0]
    tiles = problem.on_tiles(y0, diff, nondiff, times.t_start.dtype)
    launch = _triton.choose_launch(B, tiles.has_blocks, interpret=interpret)  # the forward's tiles
    TB = launch.lane_tile
    num_tiles = fwd.iterations.shape[0]
    Bp = num_tiles * TB
    if fwd.save_iter.shape[-1] != Bp:  # a launch that changed between the two traces
        raise AssertionError(f"the forward kernel stored {fwd.save_iter.shape[-1]} lanes in {num_tiles} tiles, "
                             f"the reverse kernel's launch has {TB} lanes per tile")
    T = times.ts.shape[0]
    R = config.tape_rows
    dtype = y0[0].dtype
    components = tiles.components(y0)
    L = len(components)
    columns = tape_columns(config, tiles.leaf_sizes)  # the components each tape row stores
    position = {component: j for j, component in enumerate(columns)}  # its column in a row block
    arg_inputs, arg_axes = tiles.arg_inputs(diff, nondiff)
    y0p, argsp = pad_lanes(Bp, (components, [0] * L), (arg_inputs, arg_axes))
    # Cotangents of the outputs, one [T, Bp] row block per state component, zero padded.
    ys_bar_rows = [jnp.pad(g.reshape(B, T, -1)[:, :, j].T, ((0, 0), (0, Bp - B)))
                   for g in ys_bar for j in range(math.prod(g.shape[2:]))]
    # Fixed steps: the iteration that saved each row, shared by the lanes that saved it
    # (NEVER_SAVED where none did), for a scalar save walk; and each lane's accepted steps,
    # from which a row's accepted lanes follow (_reference.fixed_row; padded lanes: none).
    # Adaptive solves read times and flags from the ring instead, and get the iterations each
    # lane ran, i.e. the rows it wrote (forward.write_row; padded lanes: none).
    lane_inputs = ([jnp.pad(fwd.num_accepted + fwd.num_rejected, (0, Bp - B))] if config.adaptive else
                   [jnp.min(fwd.save_iter, axis=1), jnp.pad(fwd.num_accepted, (0, Bp - B))])
    # The ring comes first: it is also an output (aliased), rewritten by each segment's replay.
    inputs = [*fwd.tape.ring, *fwd.tape.checkpoints, fwd.save_iter, *lane_inputs, fwd.iterations,
              *ys_bar_rows, *y0p, *argsp, times.ts, *time_scalars(times, config, dtype)]
    # One cotangent output per differentiable component (or leaf held whole): [Bp] per lane,
    # [tiles, *shape] partial sums when shared (reduced outside).
    slots = tiles.diff_cotangent_slots([x.dtype for x in diff])
    n_diff = len(slots)
    out_shape = [jax.ShapeDtypeStruct((Bp,), dtype) for _ in range(L)]
    out_shape += [jax.ShapeDtypeStruct((Bp,) if kind == "lane" else (num_tiles, *shape), d)
                  for kind, shape, d in slots]
    ring_outputs = range(len(out_shape), len(out_shape) + 3)
    out_shape += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in fwd.tape.ring]

    def kernel(*refs):
        ins, outs = refs[: len(inputs)], refs[len(inputs):]
        checkpoint_refs, rest = ins[3:6], ins[6:]
        save_iter_ref, rest = rest[0], rest[1:]
        if config.adaptive:
            save_at_ref, num_accepted_ref, lane_iters_ref = None, None, rest[0]
        else:
            save_at_ref, num_accepted_ref, lane_iters_ref = rest[0], rest[1], None
        rest = rest[len(lane_inputs):]
        iters_ref, rest = rest[0], rest[1:]
        ys_bar_refs, rest = rest[:L], rest[L:]
        y_refs, rest = rest[:L], rest[L:]
        arg_refs, rest = rest[: len(argsp)], rest[len(argsp):]
        ts_ref, k = rest[0], Scalars.read(rest[1:])
        y_bar_refs, args_bar_refs = outs[:L], outs[L: L + n_diff]
        ring_refs = outs[L + n_diff:]  # read and written through the outputs (the same buffers)
        states_ref, times_ref, accepted_ref = ring_refs

        lanes = _triton.lane_slice(launch)
        y_init = tuple(r[lanes] for r in y_refs)
        num_accepted = None if config.adaptive else num_accepted_ref[lanes]
        lane_iters = lane_iters_ref[lanes] if config.adaptive else None
        d_args, n_args = tiles.load_args(arg_refs, lanes)

        def field(t, y):
            return tiles.field(k.direction * t, y, d_args, n_args)

        def field_vjp(t, y, f_bar):
            return tiles.vjp(k.direction * t, y, d_args, n_args, f_bar)

        zeros = tuple(jnp.zeros((TB,), dtype) for _ in range(L))
        if config.save_ts:
            y_bar = zeros
        else:
            y_bar = tuple(r[jnp.int32(0), lanes] for r in ys_bar_refs)
        # Per lane, shared components too: summed over the tile once, after the walk. A leaf
        # held whole arrives summed over the tile from each pull.
        args_bar = [jnp.zeros(shape if kind == "whole" else (TB,), d) for kind, shape, d in slots]

        def inject(n, tprev, tnext, top):
            """Cotangents of outputs saved in iteration n (rows are shared by the tile).

            Per lane, save_iter grows with the row; rows saved later were injected already.
            Walk down from ``top`` while some lane's row was saved at or after n; remember the
            highest row where some lane still waits, to start there next time. With fixed
            steps the lanes share the iteration of each row (``save_at``): a scalar walk that
            stops at the row to start from next time.
            """

            def cond(s):
                j = jnp.maximum(s[0], 0)
                if not config.adaptive:
                    return (s[0] >= 0) & (save_at_ref[j] >= n)
                return (s[0] >= 0) & _triton.any_lane(save_iter_ref[j, lanes] >= n)

            def body(s):
                j, next_top, y0_bar, k_bars = s
                saved_at = save_iter_ref[j, lanes]
                mask = saved_at == n
                if config.adaptive:
                    next_top = jnp.where((next_top < 0) & _triton.any_lane(saved_at < n), j, next_top)
                theta = _step.linear_rescale(tprev, ts_ref[j], tnext)
                g = tuple(jnp.where(mask, r[j, lanes], 0) for r in ys_bar_refs)
                y0_bar, k_bars = _step.interpolate_vjp(theta, g, y0_bar, k_bars)
                return j - 1, next_top, y0_bar, k_bars

            k_bars = tuple(zeros for _ in range(NUM_STAGES))
            if not config.save_ts:
                return top, zeros, k_bars
            stop, next_top, y0_bar, k_bars = lax.while_loop(cond, body, (top, jnp.int32(-1), zeros, k_bars))
            return jnp.maximum(next_top, stop), y0_bar, k_bars

        def replay(c, segment, start, count):
            """Re-run an earlier segment from its checkpoint into the ring."""
            # Barriers on both sides: the previous sweep must have read every row before they
            # are overwritten, and the next must see every row written (a lane's row may be
            # written and read by different threads when the tile replicates lanes).
            _triton.barrier(interpret)
            tprev, tnext, y, f, result = read_checkpoint(config, k, checkpoint_refs, segment, start, lanes, L)

            def one(i, loop):
                tprev, tnext, y, f, result = loop
                attempted = attempt(config, field, k, start + i, tprev, tnext, y, f, result)
                write_row(config, ring_refs, i, lanes, tprev, tnext, y, attempted, columns, interpret)
                return (attempted.tprev, attempted.tnext, attempted.y, attempted.f,
                        jnp.where(attempted.nonfinite, NONFINITE, result))

            lax.fori_loop(jnp.int32(0), count, one, (tprev, tnext, y, f, result))
            _triton.barrier(interpret)
            return c

        def load_row(n, row):
            """What the sweep reads of iteration n, in ring row ``row``. The walk issues these
            loads one iteration ahead (``_schedule.reverse_loop``'s ``load``), so that they
            travel while the step before them computes its VJP.

            With adaptive steps a lane wrote rows only while it ran (``forward.write_row``):
            a lane that had finished before iteration n reads nothing and sees a rejected step
            from its initial point (flag 0, both times t_start, the state y0, increments 0),
            a point where this kernel evaluates the field's VJP for every lane anyway (the
            initial FSAL stage's, after the walk); the masked VJP then leaves its cotangents
            unchanged."""
            loaded = {}
            # n >= 0 too: a tile that ran no iteration still prefetches once, at n = -1.
            written = (n >= 0) & (n < lane_iters) if skips_finished_rows(config) else None
            if config.adaptive:
                t_start = jnp.full((TB,), k.t_start, times_ref.dtype)
                loaded["mask"] = _triton.load_lanes(accepted_ref.at[row, lanes], written, 0, interpret) != 0
                loaded["tprev"] = _triton.load_lanes(times_ref.at[row, jnp.int32(0), lanes], written, t_start, interpret)
                loaded["tnext"] = _triton.load_lanes(times_ref.at[row, jnp.int32(1), lanes], written, t_start, interpret)
            if config.tape_state:  # the stored components; the VJP never reads the others (zeros)
                fallback = [y_init] + [zeros] * TAPE_STAGES
                loaded["stored"] = [
                    tuple(_triton.load_lanes(states_ref.at[row, jnp.int32(s * len(columns) + position[i]), lanes],
                                             written, fallback[s][i], interpret) if i in position else zeros[i]
                          for i in range(L))
                    for s in range(1 + TAPE_STAGES)]
            return loaded

        def sweep(c, n, row, loaded):
            y_bar, f_bar, args_bar, top, t_above = c
            if config.adaptive:
                mask, tprev, tnext = loaded["mask"], loaded["tprev"], loaded["tnext"]
            else:  # nothing stored: shared times and the lanes still accepting at n
                # The walk visits n = N-1, N-2, ... in turn, and iteration n ends where n + 1
                # starts (bit for bit: fixed_interval's tnext never exceeds t_end): carried,
                # so each step computes one interval end, not two.
                tprev, _, mask = fixed_row(k, n, num_accepted)
                tnext, t_above = t_above, tprev
            if config.tape_state:
                stored = loaded["stored"]
            else:  # the field's VJP does not read the stage inputs built from these
                stored = [zeros] * (1 + TAPE_STAGES)
            top, y0_bar_saves, k_bars = inject(n, tprev, tnext, top)
            y0_bar, f0_bar, step_args_bar = _step.tsit5_step_vjp(
                field_vjp, tprev, tnext, stored[0], tuple(stored[1:]), k.direction * (tnext - tprev),
                mask, y_bar, f_bar, y0_bar_saves, k_bars,
            )
            return (
                _step.lane_where(mask, y0_bar, y_bar),
                _step.lane_where(mask, f0_bar, f_bar),
                [a + b for a, b in zip(args_bar, step_args_bar)],
                top,
                t_above,
            )

        num_iters = iters_ref[_triton.program_index()]
        t_last_end = (k.t_end if config.adaptive else
                      fixed_row(k, num_iters - 1, num_accepted)[1])  # tnext of the last iteration
        # Without a prefetch each step loads its own row first (fixed steps with no state on
        # the tape load nothing).
        prefetch = PIPELINE and (config.adaptive or config.tape_state)
        y_bar, f_bar, args_bar, _, _ = _schedule.reverse_loop(
            num_iters, R, (y_bar, zeros, args_bar, jnp.int32(T - 1), t_last_end),
            replay=replay, sweep=sweep if prefetch else (lambda c, n, row: sweep(c, n, row, load_row(n, row))),
            load=load_row if prefetch else None,
        )
        # The first step's FSAL stage: the field at the initial point.
        start_y_bar, start_args_bar = field_vjp(jnp.full((TB,), k.t_start), y_init, f_bar)
        y_bar = tuple(a + b for a, b in zip(y_bar, start_y_bar))
        args_bar = [a + b for a, b in zip(args_bar, start_args_bar)]
        if config.save_ts:
            # t0 == t1: every output is y0 itself.
            def add_row(j, acc):
                return tuple(a + r[j, lanes] for a, r in zip(acc, ys_bar_refs))

            y_bar = lax.fori_loop(jnp.int32(0), _triton.count_if(k.t_start == k.t_end, T), add_row, y_bar)
        for r, g in zip(y_bar_refs, y_bar):
            r[lanes] = g
        for r, g, (kind, _, _) in zip(args_bar_refs, args_bar, slots):
            if kind == "lane":
                r[lanes] = g
            elif kind == "tile":
                r[_triton.program_index()] = jnp.sum(g)
            else:
                r[_triton.program_index()] = g

    out = _triton.call(kernel, inputs, out_shape, launch, num_tiles=num_tiles, interpret=interpret,
                       name="fusedrk_reverse", aliases=dict(zip(range(3), ring_outputs)))
    y0_bar = tiles.join([o[:B] for o in out[:L]], (B,))
    diff_bar = tiles.join_diff_cotangents(out[L: L + n_diff], B)
    return y0_bar, diff_bar
