"""The loop schedule both backends share: a ring of tape rows, segment checkpoints, the
reverse order of a sweep with at most one replay per iteration.

A solve's loop iterations n = 0, 1, ... are cut into segments of R = ``tape_rows`` iterations.
Iteration n writes tape row ``n - segment_start`` (= n mod R) of a ring of R rows, and every
segment begins by storing a checkpoint of the loop carry (state, FSAL derivative, times,
result code). When the loop ends, the ring holds its last R iterations, and the reverse pass
sweeps them straight from it; then, for the segments before them, from the latest to the
first, it restores the segment's checkpoint, re-runs the segment's iterations not yet swept
into the ring and sweeps them. So a solve of N iterations replays nothing when N <= R, and
otherwise replays each of its first N - R iterations exactly once. Memory: R tape rows plus
ceil(rows / R) checkpoints.

Owns: the iteration order of the forward loop with checkpoints and of the reverse sweep, the
count of replayed iterations, and the rule that picks R when the user does not.

Must not: know what a carry, a tape row or a step is (the backends pass callbacks), or touch
memory. Only ``lax`` control flow on int32 scalars, so the same code runs in the jax backend and
inside a Pallas kernel.
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp
from jax import lax

# The smallest ring the automatic rule picks (unless max_steps is smaller): a segment has a
# fixed cost (a checkpoint, a loop entry), and a ring of 16 rows is cheap on every backend.
MIN_AUTO_ROWS = 16


def num_segments(num_iters, tape_rows: int):
    """Segments a loop of ``num_iters`` iterations fills (int, or an int32 array)."""
    return (num_iters + tape_rows - 1) // tape_rows


def replayed_iterations(num_iters, tape_rows: int):
    """Iterations a reverse pass re-runs: every one before the last ``tape_rows``, once."""
    return jnp.maximum(num_iters - tape_rows, 0)


def forward_loop(carry, *, rows: int, tape_rows, keep_going: Callable, step: Callable,
                 checkpoint: Callable | None = None, flat: bool = False):
    """Run ``carry = step(carry, n, row)`` for n = 0, 1, ... while n < rows and
    ``keep_going(carry)``; return (iterations run, carry).

    With ``checkpoint``: iterations run in segments of ``tape_rows``; ``carry =
    checkpoint(carry, segment)`` is called before the first iteration of each segment, and
    ``row`` counts iterations within the segment (the ring row). Without: one loop, row = n.

    ``flat``: the same in one loop, for XLA, which copies the whole ring into a loop nested
    in another (README example: jit(grad) 30 -> 27 ms). ``checkpoint`` is then called before
    every iteration: with its segment at a segment's first iteration, otherwise with the next
    segment (capped at the last slot), whose checkpoint is written at that segment's start
    before anything reads it. This is safe because the last segment a loop runs is never
    replayed (the ring holds it: see ``reverse_loop``), so its slot may hold anything. An
    unconditional write is cheaper there than a conditional one.
    """
    def go(state):
        n, c = state
        return (n < rows) & keep_going(c)

    if checkpoint is not None and flat:
        last_slot = num_segments(rows, tape_rows) - 1

        def flat_body(state):
            n, c = state
            row, segment = n % tape_rows, n // tape_rows
            c = checkpoint(c, jnp.where(row == 0, segment, jnp.minimum(segment + 1, last_slot)))
            return n + 1, step(c, n, row)

        return lax.while_loop(go, flat_body, (jnp.int32(0), carry))

    if checkpoint is None:
        def body(state):
            n, c = state
            return n + 1, step(c, n, n)

        return lax.while_loop(go, body, (jnp.int32(0), carry))

    def segment(state):
        start, c = state
        c = checkpoint(c, start // tape_rows)
        stop = jnp.minimum(start + tape_rows, rows)

        def inner_go(inner):
            n, c = inner
            return (n < stop) & keep_going(c)

        def inner(inner):
            n, c = inner
            return n + 1, step(c, n, n - start)

        return lax.while_loop(inner_go, inner, (start, c))

    return lax.while_loop(go, segment, (jnp.int32(0), carry))


def reverse_loop(num_iters, tape_rows: int, carry, *, replay: Callable, sweep: Callable,
                 around_replays: Callable | None = None, load: Callable | None = None):
    """Visit iterations n = num_iters - 1 .. 0 with ``carry = sweep(carry, n, row)``.

    After the forward loop the ring holds the last R iterations (iteration n in row n mod R,
    whichever segment it belongs to): they are swept first, straight from the ring. The
    iterations before them are swept segment by segment, from the latest: before segment s
    is swept, ``carry = replay(carry, s, start, count)`` must restore checkpoint s and re-run
    ``count`` iterations (n = start .. start + count - 1) into ring rows 0 .. count - 1. Only
    the first of these replays may stop short of a whole segment; together they re-run
    ``replayed_iterations(num_iters, tape_rows)`` iterations.

    ``load(n, row)``, if given, reads what a sweep needs of iteration n's ring row, and the
    loop is software pipelined: ``carry = sweep(carry, n, row, load(n, row))``, where each
    iteration first issues the loads of the iteration it visits next (the last one's again at
    the end of a run), so that they are in flight while this iteration computes. Every row it
    loads lies in 0 .. R - 1.

    ``around_replays(run, num_replayed_segments, carry) -> carry``, if given, runs the replay
    phase ``run(carry)`` itself: the jax backend skips it when nothing is replayed and gives
    it a ring of its own (see fusedrk/_reference.py ``backward``).
    """
    R = tape_rows
    num_iters = jnp.asarray(num_iters, jnp.int32)
    first_in_ring = jnp.maximum(num_iters - R, 0)

    def visit(c, count, n_of, row_of):
        """Sweep iterations n_of(0), n_of(1), ... (count of them), in rows row_of(i)."""
        if load is None:
            return lax.fori_loop(jnp.int32(0), count, lambda i, c: sweep(c, n_of(i), row_of(i)), c)

        def load_at(i):
            i = jnp.clip(i, 0, jnp.maximum(count - 1, 0))
            return load(n_of(i), jnp.clip(row_of(i), 0, R - 1))

        def body(i, s):
            c, current = s
            following = load_at(i + 1)
            return sweep(c, n_of(i), row_of(i), current), following

        c, _ = lax.fori_loop(jnp.int32(0), count, body, (c, load_at(jnp.int32(0))))
        return c

    carry = visit(carry, num_iters - first_in_ring, lambda i: num_iters - 1 - i, lambda i: (num_iters - 1 - i) % R)
    replayed_segments = num_segments(first_in_ring, R)

    def segment(j, c):
        s = replayed_segments - 1 - j
        start = s * R
        stop = jnp.minimum(start + R, first_in_ring)
        c = replay(c, s, start, stop - start)
        return visit(c, stop - start, lambda i: stop - 1 - i, lambda i: stop - 1 - i - start)

    def run(c):
        return lax.fori_loop(jnp.int32(0), replayed_segments, segment, c)

    if around_replays is None:
        return run(carry)
    return around_replays(run, replayed_segments, carry)


def choose_tape_rows(tape_rows, *, rows: int, known_fixed: bool, row_bytes: int, checkpoint_bytes: int,
                     budget_bytes: int) -> int:
    """R for a solve whose loop runs at most ``rows`` iterations.

    An explicit ``tape_rows`` is capped at ``rows`` (more rows could never be written). With
    fixed steps and concrete times ``rows`` is the exact iteration count: keep every one (zero
    replay). Otherwise the largest R whose tape (R rows plus ceil(rows / R) checkpoints) fits
    ``budget_bytes``; when none does, the R with the smallest tape (about sqrt(rows x
    checkpoint / row)). Never below ``MIN_AUTO_ROWS`` (unless ``rows`` is), never above ``rows``.
    """
    if tape_rows is not None:
        return min(int(tape_rows), rows)
    if known_fixed:
        return rows

    def total(R):
        return R * row_bytes + num_segments(rows, R) * checkpoint_bytes

    smallest = max(1, min(rows, round(math.sqrt(rows * checkpoint_bytes / max(row_bytes, 1)))))
    best = smallest
    if total(smallest) <= budget_bytes:
        lo, hi = smallest, rows  # total grows with R above the smallest tape: bisect
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if total(mid) <= budget_bytes:
                lo = mid
            else:
                hi = mid - 1
        best = lo
    return min(rows, max(best, MIN_AUTO_ROWS))
