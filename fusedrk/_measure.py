"""Timing and error measurement shared by the demonstration and the benchmarks.

Owns: how a jitted call is timed honestly (first call = compile, then a warm-up, then repeats
with block_until_ready) and how two results are compared (max relative error over pytrees).
Must not: be used by the solver itself.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import numpy as np


# The project's float32 rounding model, used by the tests and the GPU check: two Tsit5
# implementations that differ only in rounding agree to 10 ulps per step (errors add at worst
# linearly; a gradient sweeps the steps twice). With adaptive steps, where rounding can flip an
# accept/reject decision, they agree to ENVELOPE_MULTIPLE times the change the reference shows
# when its initial state moves by one ulp (``one_ulp_up``), plus that bound.
ULPS_PER_STEP = 10
ENVELOPE_MULTIPLE = 4


def rounding_tol(dtype, num_steps: int) -> float:
    """Relative tolerance of the rounding model: ULPS_PER_STEP ulps of ``dtype`` per step."""
    return ULPS_PER_STEP * float(np.finfo(dtype).eps) * max(num_steps, 1)


class Timing(NamedTuple):
    out: Any  # the first call's result
    compile_s: float  # first call: tracing, compilation and one run
    p20_s: float
    median_s: float
    p80_s: float


def timed(fn, *args, repeats: int = 5, sync=jax.block_until_ready, budget_s: float | None = None) -> Timing:
    """Times fn(*args); ``sync`` waits until a result is computed (another framework's).
    With ``budget_s``, a call slow enough that the repeats would exceed it is repeated fewer
    times (at least once): the warm-up call says how long one run takes."""
    start = time.perf_counter()
    out = sync(fn(*args))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    sync(fn(*args))  # warm-up after compilation
    one_run = time.perf_counter() - start
    if budget_s is not None:
        repeats = max(1, min(repeats, int(budget_s / max(one_run, 1e-9))))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn(*args))
        runs.append(time.perf_counter() - start)
    p20, median, p80 = np.percentile(runs, [20, 50, 80])
    return Timing(out, compile_s, float(p20), float(median), float(p80))


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| over all leaves; inf when they disagree on
    which entries are finite (e.g. a save one side never reached)."""
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(actual)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(expected)])
    finite = np.isfinite(b)
    if not np.array_equal(finite, np.isfinite(a)):
        return float("inf")
    scale = max(float(np.max(np.abs(b[finite]), initial=0.0)), 1e-300)
    return float(np.max(np.abs(a[finite] - b[finite]), initial=0.0)) / scale


def one_ulp_up(tree):
    """Every entry moved to the next representable number: a perturbation at rounding level,
    to measure how far a result moves from rounding alone (its rounding envelope)."""
    return jax.tree_util.tree_map(lambda x: jax.numpy.nextafter(x, jax.numpy.asarray(np.inf, x.dtype)), tree)
