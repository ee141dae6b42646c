"""solve(): validation, pytree flattening, backend choice, the custom_vjp, Solution.

Owns: the public contract of docs/design.md. Inputs are checked here, before any device
work, with messages that name the argument; the user's pytrees are flattened into tuples of
[B, ...] leaves; times are normalised to increase (diffrax's ``direction``); the forward and
reverse sweeps of a backend are wrapped in one ``jax.custom_vjp`` whose primal runs without a
tape.

Must not: contain step algebra (``_step.py``) or loops over steps (``_reference.py``).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from . import _liveness, _reference, _schedule, _shard, _step
from ._reference import TAPE_STAGES


class RESULTS:
    """Per-lane result codes of ``Solution.result``."""

    successful = _reference.SUCCESSFUL
    max_steps_reached = _reference.MAX_STEPS_REACHED  # same code as diffrax
    nonfinite = _reference.NONFINITE

    messages = {
        max_steps_reached: "the maximum number of solver steps was reached; raise max_steps",
        nonfinite: "the state or the step size became non-finite (NaN or inf)",
    }


class Solution(eqx.Module):
    """What ``solve`` returns; the layout of ``jax.vmap(diffrax.diffeqsolve)``.

    ts: [T] save times (T = 1 for t1 only). ys: pytree like y0, each leaf [B, T, ...].
    stats: dict of int [B] arrays ``num_steps``, ``num_accepted_steps``,
    ``num_rejected_steps`` (diffrax's) and ``num_replayed_iterations``: loop iterations of the
    lane's loop (the whole batch on backend "jax", its lane tile in the kernels) that a reverse
    pass re-runs because the tape ring holds fewer (0 when the solve fits ``tape_rows``).
    result: int [B], codes in ``fusedrk.RESULTS``.
    t_final: [B] the time each lane reached: t1 where it succeeded, where it stopped
    otherwise (the last accepted step's end when max_steps ran out). It carries no gradient.
    """

    ts: jax.Array
    ys: Any
    stats: dict
    result: jax.Array
    t_final: jax.Array


class _ArgsLayout(NamedTuple):
    """How the user's ``args`` pytree splits into static leaves and array leaves."""

    treedef: Any
    static: tuple  # per leaf: the static value, or None for an array leaf
    diff_index: tuple  # positions of floating-point array leaves (differentiable)
    nondiff_index: tuple  # positions of other array leaves
    diff_axes: tuple  # 0 (per lane) or None (shared), per differentiable leaf
    nondiff_axes: tuple

    def rebuild(self, diff, nondiff):
        leaves = list(self.static)
        for i, x in zip(self.diff_index, diff):
            leaves[i] = x
        for i, x in zip(self.nondiff_index, nondiff):
            leaves[i] = x
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


class _Axis:
    """Marks an axis value in a broadcast prefix tree (None must survive flattening)."""

    def __init__(self, axis):
        self.axis = axis


_BACKENDS = ("auto", "jax", "pallas")


def solve(
    vector_field: Callable,
    y0: Any,
    t0,
    t1,
    *,
    args: Any = None,
    args_axes: Any = None,
    dt0=None,
    rtol=None,
    atol=None,
    ts=None,
    max_steps: int = 4096,
    tape_rows: Optional[int] = None,
    throw: bool = True,
    backend: str = "auto",
    interpret: bool = False,
    sharding=None,
) -> Solution:
    """Integrate a batch of ODEs with Tsit5, as ``jax.vmap(diffrax.diffeqsolve)`` with ``Tsit5`` does.

    Agreement: in float64, the same accepted and rejected steps per lane, values and gradients
    to ~1e-12 relative. With fixed steps, the same step counts in float32 too (values within
    rounding: 10 ulps per step). In float32 with adaptive steps, values stay within the
    rounding model's bound (4x the change diffrax shows when y0 moves by one ulp), but a lane's
    step count may differ: rounding flips accept/reject decisions near scaled error = 1, as it
    does for diffrax itself when y0 moves by one ulp.

    ``vector_field(t, y, args)`` is written for ONE ODE; every leaf of ``y0`` has a leading
    batch axis B. ``args_axes`` is a ``jax.vmap``-style prefix of ``args``: 0 marks per-lane
    leaves (leading axis B), None shared ones. ``rtol``/``atol`` None: fixed steps of ``dt0``
    (diffrax ConstantStepSize); otherwise diffrax's PIDController(rtol, atol) with its
    defaults, and ``dt0=None`` picks the first step as diffrax does. ``ts``: shared save times
    (dense output); None saves y(t1) only. ``t1 < t0`` integrates backwards (``dt0 < 0``).
    Differentiable (reverse mode, first order) with respect to ``y0`` and every float leaf of
    ``args``; forward mode and a second reverse pass raise, forward-over-reverse
    (``jax.hessian``) runs on backend "jax".

    ``tape_rows``: iterations the gradient tape holds (a ring). A reverse pass over a solve
    of N > ``tape_rows`` iterations re-runs its first N - ``tape_rows`` iterations once, from
    segment checkpoints; ``Solution.stats["num_replayed_iterations"]`` says how many (0: no replay).
    None chooses: every iteration for fixed steps with concrete times, otherwise as many rows
    as fit the backend's memory budget (at most ``max_steps``).
    See docs/design.md for the full contract.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if not isinstance(max_steps, (int, np.integer)) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    if tape_rows is not None and (
        not isinstance(tape_rows, (int, np.integer)) or isinstance(tape_rows, bool) or tape_rows < 1
    ):
        raise ValueError(f"tape_rows must be a positive int (or None to choose), got {tape_rows!r}")
    if (rtol is None) != (atol is None):
        raise ValueError(
            "rtol and atol must be given together (adaptive steps) or both left None (fixed "
            f"steps of dt0); got rtol={rtol!r}, atol={atol!r}"
        )
    adaptive = rtol is not None
    if not adaptive and dt0 is None:
        raise ValueError(
            "fixed steps (rtol=atol=None) need dt0; pass dt0=..., or rtol and atol for "
            "adaptive steps"
        )

    y_treedef, y_leaves, B = _flatten_state(y0)

    tdtype = _time_dtype(t0, t1, dt0, ts)
    for name, value in (("t0", t0), ("t1", t1), ("dt0", dt0)):
        if value is not None and jnp.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar shared by all lanes, got shape {jnp.shape(value)}")
    # Values known now (not traced), in the time dtype: checked before any device work.
    known = {k: _concrete(v, tdtype) for k, v in (("t0", t0), ("t1", t1), ("dt0", dt0), ("ts", ts))}
    t0 = jnp.asarray(t0, tdtype)
    t1 = jnp.asarray(t1, tdtype)
    dt0 = None if dt0 is None else jnp.asarray(dt0, tdtype)
    with jax.numpy_dtype_promotion("standard"):
        y_flat = tuple(jnp.asarray(leaf, jnp.result_type(leaf, tdtype)) for leaf in y_leaves)
    if ts is not None:
        ts = jnp.asarray(ts, tdtype)
        if ts.ndim != 1 or ts.shape[0] == 0:
            raise ValueError(f"ts must be a non-empty 1-D array of save times, got shape {ts.shape}")
    if adaptive:
        rtol = jnp.asarray(rtol)
        atol = jnp.asarray(atol)
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if tol.ndim != 0 or not jnp.issubdtype(tol.dtype, jnp.floating) and not jnp.issubdtype(tol.dtype, jnp.integer):
                raise ValueError(f"{name} must be a real scalar, got {tol!r}")
    t0, t1, dt0, ts = _check_times(t0, t1, dt0, ts, known)

    layout, diff_args, nondiff_args = _split_args(args, args_axes, B)
    _check_field_output(vector_field, y_treedef, y_flat, layout, diff_args, nondiff_args, tdtype)

    rows = max_steps
    num_steps = None if adaptive else _concrete_num_fixed_steps(known["t0"], known["t1"], known["dt0"])
    if num_steps is not None:
        # One spare row guards against a rounding disagreement with the device.
        rows = max(1, min(max_steps, num_steps + 1))
    lane_fn = _lane_function(vector_field, y_treedef, layout)
    backend = _choose_backend(backend, lane_fn, layout, y_flat, diff_args, nondiff_args, tdtype)
    _check_pallas_device(backend, interpret)
    _shard.check_sharding_argument(sharding)
    split = _shard.batch_sharding(y_flat[0], sharding)
    # Each device keeps the tape of its own lanes: the plan is per device.
    per_device = B if split is None else -(-B // split.devices)
    # Both backends leave out of the tape the state components the field's VJP never reads.
    tape_live = _tape_live(_liveness.read_components(
        lane_fn, [jax.ShapeDtypeStruct(y.shape[1:], y.dtype) for y in y_flat],
        [_lane_struct(x, a) for x, a in zip(diff_args, layout.diff_axes)],
        [_lane_struct(x, a) for x, a in zip(nondiff_args, layout.nondiff_axes)], jax.ShapeDtypeStruct((), tdtype)),
        y_flat)
    plan = tape_plan(tuple(jax.ShapeDtypeStruct((per_device,) + y.shape[1:], y.dtype) for y in y_flat),
                     tdtype, rows=rows, backend=backend, adaptive=adaptive,
                     known_fixed=num_steps is not None, tape_rows=tape_rows, tape_live=tape_live,
                     interpret=interpret)
    config = _reference.Config(adaptive=adaptive, save_ts=ts is not None, rows=rows, tape_rows=plan.rows,
                               tape_live=tape_live)
    core = _make_core(lane_fn, layout, config, plan, choose_dt0=dt0 is None, backend=backend, interpret=interpret,
                      throw=throw)
    # Traced on several devices, the forward's check runs on each device's own codes: outside
    # the per-device body, equinox's callback would gather every output onto one device.
    traced = any(isinstance(x, jax.core.Tracer) for x in (*y_flat, *diff_args, *nondiff_args))
    check_per_device = throw and traced and split is not None
    if split is not None:
        def check(out):
            return (_raise_if_failed(out[0], out[3]),) + tuple(out[1:])

        core = _shard.sharded(core, split, B, per_lane=(
            True, [a == 0 for a in layout.diff_axes], [a == 0 for a in layout.nondiff_axes],
            False, False, False, False, False, False), check=check if check_per_device else None)

    zero_t = jnp.zeros((), tdtype)
    times = dict(t0=t0, t1=t1, dt0=zero_t if dt0 is None else dt0, ts=jnp.zeros((1,), tdtype) if ts is None else ts,
                 rtol=zero_t if rtol is None else rtol, atol=zero_t if atol is None else atol)
    times = {name: _not_differentiated(value, name) for name, value in times.items()}
    ys_flat, num_accepted, num_rejected, result, num_replayed, t_final = core(
        y_flat, diff_args, nondiff_args, times["t0"], times["t1"], times["dt0"], times["ts"], times["rtol"],
        times["atol"],
    )
    if throw and not check_per_device:
        ys_flat = _raise_if_failed(ys_flat, result)
    stats = {
        "num_steps": num_accepted + num_rejected,
        "num_accepted_steps": num_accepted,
        "num_rejected_steps": num_rejected,
        "num_replayed_iterations": num_replayed,
    }
    return Solution(
        ts=t1[None] if ts is None else ts,
        ys=jax.tree_util.tree_unflatten(y_treedef, list(ys_flat)),
        stats=stats,
        result=result,
        t_final=lax.stop_gradient(t_final),
    )


def _tape_live(read: tuple, y_flat) -> Optional[tuple]:
    """``Config.tape_live`` from ``_liveness.read_components``: None when every component is read."""
    if all(len(r) == int(np.prod(y.shape[1:])) for r, y in zip(read, y_flat)):
        return None
    return read


def _failure_message(code: int) -> str:
    return (f"fusedrk.solve: a lane failed: {RESULTS.messages[code]} (pass throw=False to get "
            "per-lane codes in Solution.result instead)")


def _raise_if_failed(x, result):
    """x, or an error when some lane's result code is not success (``throw=True``).

    Called eagerly (concrete codes this process can read) this raises here, in Python, so the
    traceback names the failing call; equinox's check, which is compiled once and cached, would
    name the line of the first call that traced it. Traced, the check is an equinox runtime
    error tied to x."""
    if not isinstance(result, jax.core.Tracer) and result.is_fully_addressable:
        codes = np.asarray(result)
        if np.any(codes != RESULTS.successful):
            raise eqx.EquinoxRuntimeError(_failure_message(int(np.max(codes))))
        return x
    codes = sorted(RESULTS.messages)
    return eqx.branched_error_if(
        x,
        jnp.any(result != RESULTS.successful),
        jnp.maximum(jnp.max(result) - codes[0], 0),
        [_failure_message(code) for code in codes],
    )


# ------------------------------------------------------------------------------ validation


def _concrete(x, dtype) -> Optional[np.ndarray]:
    """The value of x in ``dtype`` if known at trace time (None when absent or traced)."""
    if x is None:
        return None
    try:
        return np.asarray(x).astype(dtype)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _flatten_state(y0):
    """(treedef, leaves, B) of the initial state, each leaf a float array [B, ...]."""
    y_paths, y_treedef = jax.tree_util.tree_flatten_with_path(y0)
    if not y_paths:
        raise ValueError("y0 has no array leaves")
    names = ["y0" + jax.tree_util.keystr(path) for path, _ in y_paths]
    leaves = [leaf for _, leaf in y_paths]
    for name, leaf in zip(names, leaves):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"{name} must be an array with a leading batch axis, got {type(leaf).__name__}")
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating-point dtype, got {leaf.dtype}")
        if leaf.ndim < 1:
            raise ValueError(f"{name} must have a leading batch axis, got shape {leaf.shape}")
    B = leaves[0].shape[0]
    for name, leaf in zip(names, leaves):
        if leaf.shape[0] != B:
            raise ValueError(
                f"every leaf of y0 needs the same leading batch axis: {names[0]} has {B} lanes, "
                f"{name} has {leaf.shape[0]}"
            )
    if B == 0:
        raise ValueError("y0 has an empty batch axis (B = 0)")
    return y_treedef, leaves, B


def _direction(t0, t1):
    """+1 for a solve forwards in time, -1 backwards (diffrax's ``direction``)."""
    return jnp.where(t0 < t1, 1, -1)


def _time_dtype(t0, t1, dt0, ts):
    # Array-likes (a list of save times) count as the arrays they make, as diffrax takes them.
    timelikes = [jnp.asarray(x) if isinstance(x, (list, tuple)) else x
                 for x in (t0, t1, dt0, ts) if x is not None]
    with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.result_type(*timelikes)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.result_type(float)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"t0, t1, dt0 and ts must be real numbers, got dtype {dtype}")
    return dtype


def _check_times(t0, t1, dt0, ts, known):
    """Concrete problems raise now; traced ones raise at run time (equinox error_if)."""
    c0, c1 = known["t0"], known["t1"]
    if dt0 is not None:
        bad_sign = "dt0 must have the sign of t1 - t0 (negative to integrate backwards)"
        zero = "dt0 must be non-zero"
        cd = known["dt0"]
        if c0 is not None and c1 is not None and cd is not None:
            if (c1 - c0) * cd < 0:
                raise ValueError(f"{bad_sign}; got t0={c0}, t1={c1}, dt0={cd}")
            if cd == 0 and c0 != c1:
                raise ValueError(f"{zero}; got dt0=0 with t0={c0}, t1={c1}")
        else:
            dt0 = eqx.error_if(dt0, (t1 - t0) * dt0 < 0, bad_sign)
            dt0 = eqx.error_if(dt0, (dt0 == 0) & (t0 != t1), zero)
    if ts is not None:
        unsorted = ["ts must be sorted in the direction of integration: increasing, as t1 > t0",
                    "ts must be sorted in the direction of integration: decreasing, as t1 < t0 (a backward solve)"]
        outside = "ts must lie between t0 and t1"
        cts = known["ts"]
        if c0 is not None and c1 is not None and cts is not None:
            direction = 1 if c0 < c1 else -1
            steps = np.diff(cts * direction)
            if np.any(steps < 0) or np.any(np.isnan(cts)):
                raise ValueError(f"{unsorted[direction < 0]}; got ts={cts}, t0={c0}, t1={c1}")
            lo, hi = min(c0, c1), max(c0, c1)
            if np.any(cts < lo) or np.any(cts > hi):
                raise ValueError(f"{outside}; got ts={cts}, t0={c0}, t1={c1}")
        else:
            direction = _direction(t0, t1)
            ts = eqx.branched_error_if(ts, jnp.any(jnp.diff(ts * direction) < 0), direction < 0, unsorted)
            lo, hi = jnp.minimum(t0, t1), jnp.maximum(t0, t1)
            ts = eqx.error_if(ts, jnp.any((ts < lo) | (ts > hi)), outside)
    return t0, t1, dt0, ts


def _concrete_num_fixed_steps(c0, c1, cd) -> Optional[int]:
    """diffrax's ConstantStepSize step count, when the times are known at trace time."""
    if c0 is None or c1 is None or cd is None:
        return None
    direction = 1 if c0 < c1 else -1
    span = c1 * direction - c0 * direction
    dt = cd * direction
    if dt == 0:
        return 0
    return int(np.ceil(span / np.nextafter(dt, np.inf)))


def _split_args(args, args_axes, B):
    """Split args into static leaves, differentiable (float) and other array leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    axes = _broadcast_axes(args_axes, args, len(leaves))
    static, diff, nondiff = [], [], []
    diff_index, nondiff_index, diff_axes, nondiff_axes = [], [], [], []
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(args)[0]]
    for i, (leaf, axis, path) in enumerate(zip(leaves, axes, paths)):
        name = "args" + path
        if axis not in (0, None):
            raise ValueError(f"args_axes entries must be 0 (per lane) or None (shared); {name} has {axis!r}")
        if isinstance(leaf, np.ndarray):
            leaf = jnp.asarray(leaf)
        if not isinstance(leaf, jax.Array):
            if axis == 0:
                raise ValueError(f"{name} is marked per-lane (axis 0) but is not an array: {leaf!r}")
            static.append(leaf)
            continue
        if axis == 0 and (leaf.ndim == 0 or leaf.shape[0] != B):
            raise ValueError(
                f"{name} is marked per-lane (axis 0) and needs a leading axis of {B} lanes, "
                f"got shape {leaf.shape}"
            )
        static.append(None)
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            diff_index.append(i)
            diff_axes.append(axis)
            diff.append(leaf)
        else:
            nondiff_index.append(i)
            nondiff_axes.append(axis)
            nondiff.append(leaf)
    layout = _ArgsLayout(
        treedef=treedef,
        static=tuple(static),
        diff_index=tuple(diff_index),
        nondiff_index=tuple(nondiff_index),
        diff_axes=tuple(diff_axes),
        nondiff_axes=tuple(nondiff_axes),
    )
    return layout, list(diff), list(nondiff)


def _broadcast_axes(args_axes, args, num_leaves):
    if args_axes is None or isinstance(args_axes, int):
        return [args_axes] * num_leaves
    try:
        marked = jax.tree_util.tree_map(
            lambda axis, sub: jax.tree_util.tree_map(lambda _: _Axis(axis), sub),
            args_axes,
            args,
            is_leaf=lambda x: x is None,
        )
    except ValueError as e:
        raise ValueError(f"args_axes must be a prefix of the structure of args: {e}") from None
    return [m.axis for m in jax.tree_util.tree_leaves(marked, is_leaf=lambda x: isinstance(x, _Axis))]


def _lane_struct(x, axis):
    shape = x.shape[1:] if axis == 0 else x.shape
    return jax.ShapeDtypeStruct(shape, x.dtype)


def _check_field_output(vector_field, y_treedef, y_flat, layout, diff, nondiff, tdtype):
    """Trace the field on one lane and check it returns the structure and shapes of y."""
    y_lane = jax.tree_util.tree_unflatten(y_treedef, [jax.ShapeDtypeStruct(y.shape[1:], y.dtype) for y in y_flat])
    args_lane = layout.rebuild(
        [_lane_struct(x, a) for x, a in zip(diff, layout.diff_axes)],
        [_lane_struct(x, a) for x, a in zip(nondiff, layout.nondiff_axes)],
    )
    hint = _args_axes_hint(layout, diff, nondiff, y_flat[0].shape[0])
    try:
        out = jax.eval_shape(lambda t, y, a: vector_field(t, y, a), jax.ShapeDtypeStruct((), tdtype), y_lane,
                             args_lane)
    except (TypeError, ValueError) as e:
        if not hint:
            raise
        try:  # keep the exception's type (a JAX shape error is a TypeError)
            error = type(e)(f"{e}\n{hint}")
        except Exception:
            error = ValueError(f"{e}\n{hint}")
        raise error from e
    out_leaves, out_treedef = jax.tree_util.tree_flatten(out)
    if out_treedef != y_treedef:
        raise ValueError(
            f"the vector field must return the structure of one lane of y0: expected "
            f"{y_treedef}, got {out_treedef}"
        )
    for y, o in zip(y_flat, out_leaves):
        if tuple(o.shape) != tuple(y.shape[1:]):
            raise ValueError(
                f"the vector field returned a leaf of shape {tuple(o.shape)} where one lane of y0 "
                f"has shape {tuple(y.shape[1:])}" + (f"; {hint}" if hint else "")
            )


def _args_axes_hint(layout, diff, nondiff, B) -> str:
    """Advice when a shared argument looks per-lane (leading axis B): the field then sees the
    whole batch of it in one lane, a common slip that surfaces as a shape error."""
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(layout.rebuild(diff, nondiff))[0]]
    leaves = [*zip(layout.diff_index, diff, layout.diff_axes), *zip(layout.nondiff_index, nondiff, layout.nondiff_axes)]
    names = ["args" + jax.tree_util.keystr(paths[i]) for i, x, axis in sorted(leaves, key=lambda e: e[0])
             if axis is None and x.ndim >= 1 and x.shape[0] == B]
    if not names:
        return ""
    return (f"{', '.join(names)} has a leading axis of {B} lanes but is shared (args_axes None), so the "
            "field sees all of it in every lane; if it holds one value per lane, pass args_axes=0 (or "
            "a prefix tree of args_axes marking it 0)")


def _device_memory_bytes() -> int:
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some platforms do not implement memory_stats
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def tape_bytes(rows: int, y_flat: tuple, time_itemsize: int, *, backend: str, adaptive: bool,
               segments: int = 0, tape_live: Optional[tuple] = None, interpret: bool = False) -> int:
    """Bytes of the gradient tape ``backend`` stores for ``rows`` ring rows and ``segments``
    checkpoints.

    A row holds, per lane, the start state and k_1..k_6, and with adaptive steps the step's two
    times and an accepted flag (fixed steps compute both: ``_reference.fixed_row``); a
    checkpoint the state, the FSAL derivative, a result code and two times (adaptive: per lane;
    fixed: the jax backend keeps the shared pair, the kernels none). The kernels store whole
    lane tiles (B padded up to a multiple of the tile ``kernels/_triton.choose_launch`` picks
    for B, the GPU and ``interpret``; a field with block values, whose tiles are the smallest,
    may store a little less), times for
    every lane, int32 flags and one-row placeholders for what they do not store. The jax
    backend stores B lanes and a bool flag. Rows hold only the state components in
    ``tape_live`` (``Config.tape_live``: those the field's VJP reads, fusedrk/_liveness.py;
    None: all), and no state or increments when it holds none.
    """
    B = y_flat[0].shape[0]
    sizes = [int(np.prod(y.shape[1:])) for y in y_flat]
    state = sum(n * y.dtype.itemsize for n, y in zip(sizes, y_flat))
    live = [range(n) for n in sizes] if tape_live is None else tape_live
    tape_state = any(live)
    per_lane = (1 + TAPE_STAGES) * sum(len(cols) * y.dtype.itemsize for cols, y in zip(live, y_flat))
    extra = 0
    if backend == "pallas":
        from fusedrk.kernels import _triton

        lanes = _triton.padded_batch(B, interpret=interpret)
        times = 2 * time_itemsize if adaptive else 0
        row = lanes * (per_lane + times + (4 if adaptive else 0))
        checkpoint = lanes * (2 * state + times + 4)
        if not tape_state and rows:  # the states' [1, 1, lanes] placeholder
            extra = lanes * y_flat[0].dtype.itemsize
        if not adaptive:  # [1, ...] placeholders: ring times and flags, checkpoint times
            extra += lanes * ((2 * time_itemsize + 4 if rows else 0) + (2 * time_itemsize if segments else 0))
    elif adaptive:
        row = B * (per_lane + 1 + 2 * time_itemsize)
        checkpoint = B * (2 * state + 4 + 2 * time_itemsize)
    else:  # rows without times or flags (_reference.fixed_row); a checkpoint's times are shared
        row = B * per_lane
        checkpoint = B * (2 * state + 4) + 2 * time_itemsize
    return rows * row + segments * checkpoint + extra


# The automatic ring's memory budget per backend (``tape_rows=None``), chosen by measurement
# (``python -m bench.tape_rows``; the numbers are in README "Gradients: the tape"). The
# kernels' tape is a Pallas output, which XLA does not initialise, so unused rows cost memory
# only: up to a quarter of the device's memory. The jax backend's ring is a while-loop carry;
# on a CPU it is left uninitialised too (fusedrk/_uninitialised.py), so unused rows cost no
# time, but once a gradient's scratch memory passes glibc's 32 MiB mmap ceiling every call
# gets fresh pages, and each page the tape writes faults in; a replayed iteration costs one
# forward step. So 16 MiB, which leaves room below the ceiling for the rest of the gradient.
# The README example's smallest tape (40 rows and 103 checkpoints, 30 MB) is already over it,
# so it gets that one: 25.7 ms, replaying 15 of 55 iterations, against 32.2 ms for 64 rows and
# no replay (35 MB of scratch). On a GPU, where the ring is still filled before the loop at ~20x a CPU's
# bandwidth, 1 GiB (not yet measured there).
PALLAS_TAPE_FRACTION = 0.25
JAX_TAPE_BYTES = {"cpu": 16 * 2**20, "gpu": 2**30}


class TapePlan(NamedTuple):
    rows: int  # R, the ring's rows
    segments: int  # checkpoints
    ring_bytes: int
    checkpoint_bytes: int  # all segments' checkpoints together

    @property
    def bytes(self) -> int:
        return self.ring_bytes + self.checkpoint_bytes


def tape_plan(y_flat: tuple, tdtype, *, rows: int, backend: str, adaptive: bool, known_fixed: bool,
              tape_rows: Optional[int] = None, tape_live: Optional[tuple] = None,
              interpret: bool = False) -> TapePlan:
    """The tape a gradient of this solve stores: R chosen by ``_schedule.choose_tape_rows``
    (or ``tape_rows`` capped at the loop's ``rows``), its segments and its bytes."""
    sizes = dict(backend=backend, adaptive=adaptive, tape_live=tape_live, interpret=interpret)
    itemsize = np.dtype(tdtype).itemsize
    R = _schedule.choose_tape_rows(
        tape_rows, rows=rows, known_fixed=known_fixed, row_bytes=tape_bytes(1, y_flat, itemsize, **sizes),
        checkpoint_bytes=tape_bytes(0, y_flat, itemsize, segments=1, **sizes),
        budget_bytes=tape_budget_bytes(backend),
    )
    segments = _schedule.num_segments(rows, R)
    return TapePlan(R, segments, tape_bytes(R, y_flat, itemsize, **sizes),
                    tape_bytes(0, y_flat, itemsize, segments=segments, **sizes))


def tape_budget_bytes(backend: str) -> int:
    """Memory the automatic rule lets the tape of ``backend`` (ring and checkpoints) take on the
    default device."""
    if backend == "pallas":
        return int(PALLAS_TAPE_FRACTION * _device_memory_bytes())
    return min(JAX_TAPE_BYTES.get(jax.default_backend(), JAX_TAPE_BYTES["gpu"]), _device_memory_bytes() // 4)


# ----------------------------------------------------------------------------- custom_vjp


def _check_tape_fits(plan: TapePlan, rows: int, lanes: int) -> None:
    """MemoryError, with the sizes and what to change, when the tape cannot fit the device."""
    available = _device_memory_bytes()
    if plan.bytes <= available:
        return
    raise MemoryError(
        f"fusedrk.solve: the gradient tape needs {_size(plan.bytes)} ({plan.rows} rows x {lanes} "
        f"lanes: {_size(plan.ring_bytes)}; {plan.segments} segment checkpoints for up to {rows} "
        f"iterations: {_size(plan.checkpoint_bytes)}) but the device has {_size(available)}; "
        "lower tape_rows (a smaller ring), raise it (fewer checkpoints), lower max_steps, or split "
        "the batch"
    )


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _not_differentiated(x, name: str):
    """x; differentiating through it raises (the times and tolerances of a solve)."""
    return x


@functools.partial(_not_differentiated.defjvp, symbolic_zeros=True)
def _not_differentiated_jvp(name, primals, tangents):
    (x,), (dx,) = primals, tangents
    if not isinstance(dx, SymbolicZero):
        raise ValueError(f"fusedrk.solve is not differentiable with respect to {name}: gradients "
                         "flow to y0 and to floating-point leaves of args only")
    return x, dx


# What differentiation solve supports, said once for both refusals below. Forward-over-reverse
# runs on backend "jax" because its reverse sweep is plain JAX that forward mode can push
# tangents through (the kernels' is not); with adaptive steps it also differentiates the step
# sizes, which diffrax holds constant (README "API").
_SUPPORTED_AD = ("fusedrk.solve supports reverse-mode derivatives of first order (jax.grad, jax.vjp, "
                 "jax.jacrev, jax.value_and_grad); for second derivatives, forward-over-reverse "
                 '(jax.hessian, jax.jacfwd(jax.grad(f))) runs with backend="jax" and equals diffrax\'s '
                 "with fixed steps")


def _reverse_mode_only(core):
    """``core`` with JAX's refusal of forward mode (jvp of a custom_vjp) reworded for users."""

    message = (f"{_SUPPORTED_AD}. Forward mode through solve itself (jax.jvp, jax.jacfwd) is not "
               "supported: its derivative is a custom reverse sweep over the stored tape.")

    def call(*operands):
        # JAX itself refuses jvp of a custom_vjp eagerly, but under jit only when it compiles,
        # outside solve; a jvp tracer among the operands says it is coming. With direct
        # linearisation (jax >= 0.10's default) reverse mode traces with other tracers, and
        # forward-over-reverse hands solve reverse-mode tracers on top of forward ones.
        if getattr(jax.config, "jax_use_direct_linearize", False) and any(
            isinstance(x, ad.JVPTracer) for x in jax.tree_util.tree_leaves(operands)
        ):
            raise TypeError(message)
        try:
            return core(*operands)
        except TypeError as e:
            if "forward-mode autodiff" not in str(e):
                raise
            raise TypeError(message) from e

    return call


# An identity on the reverse sweep's outputs whose transpose refuses: differentiating the
# gradient in reverse mode (jax.grad(jax.grad(f))) stops here with a message, before JAX tries
# to transpose the sweep's while loops ("Reverse-mode differentiation does not work for
# lax.while_loop"). Forward mode passes tangents through it, so forward-over-reverse works.
_first_order_p = Primitive("fusedrk_first_order_gradient")
_first_order_p.def_impl(lambda x: x)
_first_order_p.def_abstract_eval(lambda x: x)
mlir.register_lowering(_first_order_p, lambda ctx, x: [x])
batching.primitive_batchers[_first_order_p] = lambda xs, dims: (_first_order_p.bind(*xs), dims[0])


def _refuse_second_reverse_pass(ct, x):
    raise ValueError(f"{_SUPPORTED_AD}. The gradient of solve cannot be differentiated again in reverse mode "
                     "(jax.grad(jax.grad(f)), jax.jacrev(jax.grad(f))).")


ad.deflinear2(_first_order_p, _refuse_second_reverse_pass)


def _first_order_only(bwd):
    def marked(residuals, cts):
        return jax.tree_util.tree_map(_first_order_p.bind, bwd(residuals, cts))

    return marked


def _lane_function(vector_field, y_treedef, layout: _ArgsLayout):
    """The user's field over flat leaves: ``fn(t, y_leaves, diff, nondiff)`` for one lane, or
    elementwise for a tile of lanes (the kernels call it that way)."""

    def fn(t, y_leaves, diff, nondiff):
        y = jax.tree_util.tree_unflatten(y_treedef, list(y_leaves))
        out = vector_field(t, y, layout.rebuild(diff, nondiff))
        return tuple(
            jnp.broadcast_to(jnp.asarray(o).astype(leaf.dtype), jnp.shape(leaf))
            for o, leaf in zip(jax.tree_util.tree_leaves(out), y_leaves)
        )

    return fn


def _choose_backend(backend, lane_fn, layout, y_flat, diff, nondiff, tdtype) -> str:
    if backend == "jax":
        return backend
    from fusedrk import kernels

    problem = kernels.TileProblem(lane_fn, layout.diff_axes, layout.nondiff_axes)
    reason = kernels.unsupported_reason(problem, y_flat, diff, nondiff, tdtype)
    if backend == "pallas" and reason is not None:
        raise ValueError(f'backend="pallas" cannot run this problem: {reason}. Use backend="jax", '
                         "which takes any vector field.")
    if backend == "auto":
        return "pallas" if reason is None and jax.default_backend() == "gpu" else "jax"
    return backend


def _check_pallas_device(backend: str, interpret: bool) -> None:
    if backend != "pallas" or interpret or jax.default_backend() == "gpu":
        return
    from fusedrk.kernels import _triton

    if not _triton.lowering_for_gpu():
        raise ValueError(
            f'backend="pallas" compiles GPU kernels, but the default JAX device is '
            f'{jax.default_backend()}; pass interpret=True to run the kernels in interpret mode '
            '(for testing), or use backend="jax"'
        )


def _make_core(lane_fn, layout: _ArgsLayout, config, plan: TapePlan, *, choose_dt0: bool, backend: str,
               interpret: bool, throw: bool):
    """Build the differentiable core for one call: (y0, args, times) -> outputs.

    With ``throw``, the backward checks the forward's result codes as well: under
    ``jax.jit(jax.grad(...))`` the forward's outputs are unused, so XLA removes the check on
    them, and a failed lane would otherwise give a silent gradient."""

    def lane_field(direction):
        def batched(t, y, diff, nondiff):
            # t is [B], or a scalar shared by all lanes (fixed steps); internal times.
            axes = (0 if jnp.ndim(t) else None, 0, list(layout.diff_axes), list(layout.nondiff_axes))
            return jax.vmap(lambda t_, *rest: lane_fn(direction * t_, *rest), in_axes=axes)(t, y, diff, nondiff)

        return batched

    if backend == "pallas":
        from fusedrk import kernels

        tile = kernels.TileProblem(lane_fn, layout.diff_axes, layout.nondiff_axes)

    def internal_times(t0, t1, dt0, ts, rtol, atol):
        direction = _direction(t0, t1)
        return _reference.Times(
            direction=direction,
            t_start=t0 * direction,
            t_end=t1 * direction,
            dt0=jnp.full_like(t0, _step.AUTO_DT0) if choose_dt0 else dt0 * direction,
            ts=ts * direction,
            rtol=rtol,
            atol=atol,
        )

    def run(y0, diff, nondiff, t0, t1, dt0, ts, rtol, atol, *, with_tape):
        times = internal_times(t0, t1, dt0, ts, rtol, atol)
        if backend == "pallas":
            return kernels.forward(config, tile, times, tuple(y0), diff, nondiff, with_tape=with_tape,
                                   interpret=interpret)
        batched = lane_field(times.direction)
        field = lambda t, y: batched(t, y, diff, nondiff)  # noqa: E731
        return _reference.forward(config, field, times, tuple(y0), with_tape=with_tape)

    def outputs(fwd, t0, t1):
        B = fwd.result.shape[0]
        if backend == "pallas":  # iterations run per lane tile
            from fusedrk.kernels import _triton

            tile = fwd.save_iter.shape[1] // fwd.iterations.shape[0]  # padded lanes / tiles
            iters = jnp.repeat(fwd.iterations, tile)[:B]
        else:  # one loop for the whole batch
            iters = jnp.broadcast_to(fwd.num_iters, (B,))
        replayed = _schedule.replayed_iterations(iters, config.tape_rows).astype(jnp.int32)
        # The user's time each lane reached (internal times run forwards).
        t_final = fwd.t_final * _direction(t0, t1).astype(fwd.t_final.dtype)
        return fwd.ys, fwd.num_accepted, fwd.num_rejected, fwd.result, replayed, t_final

    @jax.custom_vjp
    def core(y0, diff, nondiff, t0, t1, dt0, ts, rtol, atol):
        return outputs(run(y0, diff, nondiff, t0, t1, dt0, ts, rtol, atol, with_tape=False), t0, t1)

    def core_fwd(y0, diff, nondiff, t0, t1, dt0, ts, rtol, atol):
        values = [y0, diff, nondiff, t0, t1, dt0, ts, rtol, atol]
        _check_tape_fits(plan, config.rows, values[0][0].shape[0])
        fwd = run(*values, with_tape=True)
        return outputs(fwd, values[3], values[4]), (values, fwd)

    def core_bwd(residuals, cts):
        y_bar, args_bar = backward(residuals, cts)
        if throw:  # tied to every cotangent: XLA prunes the check with any one left unused
            y_bar, args_bar = _raise_if_failed((y_bar, args_bar), residuals[1].result)
        return (tuple(y_bar), args_bar, [None] * len(residuals[0][2]), None, None, None, None, None, None)

    def backward(residuals, cts):
        values, fwd = residuals
        y0, diff, nondiff, t0, t1, dt0, ts, rtol, atol = values
        ys_bar = tuple(cts[0])
        times = internal_times(t0, t1, dt0, ts, rtol, atol)
        if backend == "pallas":
            return kernels.backward(config, tile, times, tuple(y0), diff, nondiff, fwd, ys_bar,
                                    interpret=interpret)
        batched = lane_field(times.direction)

        def field_vjp(t, y, f_bar):
            _, pullback = jax.vjp(lambda y_, d_: batched(t, y_, d_, nondiff), y, diff)
            return pullback(f_bar)

        args_zero = [jnp.zeros_like(x) for x in diff]
        field = lambda t, y: batched(t, y, diff, nondiff)  # noqa: E731
        return _reference.backward(config, field, field_vjp, times, tuple(y0), fwd, ys_bar, args_zero)

    # Without symbolic zeros: JAX does not take them inside shard_map (several devices), and
    # solve keeps the times out of differentiation itself (``_not_differentiated``).
    core.defvjp(core_fwd, _first_order_only(core_bwd))
    return _reverse_mode_only(core)
