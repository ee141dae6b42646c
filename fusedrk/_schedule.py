"""The loop schedule both backends share: a ring of tape rows, segment checkpoints, the
reverse order of a sweep with at most one replay per iteration.

A solve's loop iterations n = 0, 1, ... are cut into segments of R = ``tape_rows`` iterations.
Iteration n writes tape row ``n - segment_start`` (= n mod R) of a ring of R rows, and every
segment begins by storing a checkpoint of the loop carry (state, FSAL derivative, times,
result code). The reverse pass sweeps the last segment straight from the ring; then, for each
earlier segment from the last to the first, it restores the segment's checkpoint, re-runs its
R iterations into the ring and sweeps them. So a solve of N iterations replays nothing when
N <= R, and otherwise replays each iteration outside the last segment exactly once. Memory:
R tape rows plus ceil(rows / R) checkpoints.

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
    """Iterations a reverse pass re-runs: every one outside the last segment, once."""
    segments = num_segments(num_iters, tape_rows)
    return jnp.maximum(segments - 1, 0) * tape_rows


def forward_loop(carry, *, rows: int, tape_rows, keep_going: Callable, step: Callable,
                 checkpoint: Callable | None = None):
    """Run ``carry = step(carry, n, row)`` for n = 0, 1, ... while n < rows and
    ``keep_going(carry)``; return (iterations run, carry).

    With ``checkpoint``: iterations run in segments of ``tape_rows``; ``carry =
    checkpoint(carry, segment)`` is called before the first iteration of each segment, and
    ``row`` counts iterations within the segment (the ring row). Without: one loop, row = n.
    """
    def go(state):
        n, c = state
        return (n < rows) & keep_going(c)

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


def reverse_loop(num_iters, tape_rows: int, carry, *, replay: Callable, sweep: Callable):
    """Visit iterations n = num_iters - 1 .. 0 with ``carry = sweep(carry, n, row)``.

    The last segment's rows are in the ring already. Before each earlier segment s is swept,
    ``carry = replay(carry, s, start, count)`` must restore checkpoint s and re-run ``count``
    iterations (n = start .. start + count - 1) into ring rows 0 .. count - 1; count is 0 for
    the last segment and ``tape_rows`` for the others.
    """
    num_iters = jnp.asarray(num_iters, jnp.int32)
    last = num_segments(num_iters, tape_rows) - 1

    def segment(j, c):
        s = last - j
        start = s * tape_rows
        stop = jnp.minimum(start + tape_rows, num_iters)
        c = replay(c, s, start, jnp.where(j > 0, jnp.int32(tape_rows), jnp.int32(0)))

        def one(i, c):
            n = stop - 1 - i
            return sweep(c, n, n - start)

        return lax.fori_loop(jnp.int32(0), stop - start, one, c)

    return lax.fori_loop(jnp.int32(0), last + 1, segment, carry)


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
