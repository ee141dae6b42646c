"""One Tsit5 step as pure functions over lane arrays, and its reverse-mode counterpart.

Owns: the algebra of a step (stages with FSAL, the embedded error estimate, the per-lane RMS
error norm, diffrax's PIDController and ConstantStepSize updates, diffrax's initial step
selection, the dense-output interpolant) and the reverse sweep of one step given its stored
stages. Every function takes *lane arrays*: a time or a scalar per lane has shape [L], a state
is a tuple of leaves each of shape [L, *leaf_shape]. The reference backend calls these with
L = B (the whole batch); a Pallas kernel calls them with L = TB (one tile, scalar leaves).

Must not: loop over steps, touch memory layouts or tapes, or use Python control flow on values.
Only elementwise jnp arithmetic (plus per-lane sums over a leaf's trailing axes, which vanish
for the scalar leaves a kernel uses), so the same code runs in both backends.

Conventions follow diffrax (``diffrax/_integrate.py``, ``_solver/runge_kutta.py``,
``_step_size_controller/pid.py`` and ``constant.py``); each choice is cited where it is made.
Times are *internal*: multiplied by ``direction`` (+1 or -1) so that they always increase, as
diffrax does in diffeqsolve; the field is evaluated at ``direction * t`` by the caller's
``field`` and a stage derivative is ``k_i = f_i * control`` with ``control = direction * h``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ._tableau import A_LOWER, B_ERROR, C, DENSE_WEIGHTS, ERROR_ORDER, NUM_STAGES

State = tuple  # tuple of leaves, each [L, *leaf_shape]
# field(t, state) -> state of derivatives, for lanes of one tile or one batch. Times are [L],
# or scalars shared by every lane (fixed steps); all functions here broadcast either.
Field = Callable[[jax.Array, State], State]
# field_vjp(t [L], state, cotangent of f) -> (cotangent of state, cotangent pytree of args).
FieldVJP = Callable[[jax.Array, State, State], tuple]

# diffrax PIDController defaults (pid.py): an I-controller (pcoeff=0, icoeff=1, dcoeff=0).
SAFETY = 0.9
FACTOR_MIN = 0.2
FACTOR_MAX = 10.0


# ----------------------------------------------------------------------------- lane helpers


def lane(x: jax.Array, like: jax.Array) -> jax.Array:
    """Broadcast a per-lane value [L] against a leaf [L, *leaf_shape], in the leaf's dtype."""
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(like.dtype, jnp.floating):
        x = x.astype(like.dtype)
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


def lane_where(mask: jax.Array, a: State, b: State) -> State:
    """Per-lane select between two states (or any tuples of lane-leading leaves)."""
    return tuple(jnp.where(lane(mask, x), x, y) for x, y in zip(a, b))


def _per_lane_sum(x: jax.Array) -> jax.Array:
    return x if x.ndim == 1 else jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _per_lane_any(x: jax.Array) -> jax.Array:
    return x if x.ndim == 1 else jnp.any(x.reshape(x.shape[0], -1), axis=1)


def lane_size(state: State) -> int:
    """Number of scalar components of one lane's state."""
    return sum(math.prod(leaf.shape[1:]) for leaf in state)


def all_finite(state: State) -> jax.Array:
    """[L] bool: every component of the lane's state is finite."""
    out = None
    for leaf in state:
        ok = ~_per_lane_any(~jnp.isfinite(leaf))
        out = ok if out is None else out & ok
    return out


def rms_norm(state: State) -> jax.Array:
    """Per-lane RMS norm over every component of the lane, as optimistix/lineax ``rms_norm``.

    A lane with a single component gets ``abs(x)``, as lineax's ``two_norm`` special-cases it.
    """
    size = lane_size(state)
    if size == 1:
        return jnp.abs(state[0].reshape(state[0].shape[0]))
    total = None
    for leaf in state:
        s = _per_lane_sum(leaf * leaf)
        total = s if total is None else total + s
    return jnp.sqrt(total) / math.sqrt(size)


# ---------------------------------------------------------------------------- stage algebra


def stage_times(t0: jax.Array, t1: jax.Array) -> tuple:
    """Times of stages 1..7. Nodes with c == 1 use t1 itself (diffrax runge_kutta.py: "No
    floating point error"), the others t0 + c * (t1 - t0)."""
    dt = t1 - t0
    return tuple(t0 if c == 0 else (t1 if c == 1 else t0 + c * dt) for c in C)


def stage_input(i: int, y0: State, ks: tuple) -> State:
    """Input of stage i (0-based, 1..6): y0 + sum_{j<i} a_ij k_j. Stage 6's input is y1."""
    row = A_LOWER[i - 1]
    out = []
    for leaf_index, y0_leaf in enumerate(y0):
        increment = row[0] * ks[0][leaf_index]
        for a, k in zip(row[1:], ks[1:i]):
            increment = increment + a * k[leaf_index]
        out.append(y0_leaf + increment)
    return tuple(out)


def _scale(f: State, control: jax.Array) -> State:
    return tuple(leaf * lane(control, leaf) for leaf in f)


def tsit5_step(field: Field, t0, t1, y0: State, f0: State, control, end_field: Field | None = None) -> tuple:
    """Attempt one step from t0 to t1. ``f0`` is the field at (t0, y0), known by FSAL.

    Returns (y1, ks, f_end): the candidate solution, the seven stage increments
    k_i = control * f_i, and the field at (t1, y1) for the next step's FSAL. Six field
    evaluations; the last (at (t1, y1)) by ``end_field`` if given.
    """
    times = stage_times(t0, t1)
    ks = [_scale(f0, control)]
    f_i = f0
    for i in range(1, NUM_STAGES):
        y_i = stage_input(i, y0, ks)
        f_i = (field if end_field is None or i < NUM_STAGES - 1 else end_field)(times[i], y_i)
        ks.append(_scale(f_i, control))
    # Stage 7 is FSAL: its input is the propagated solution (diffrax skips the b_sol sum for
    # "ssal" tableaux and returns the last stage input).
    y1 = y_i
    return y1, tuple(ks), f_i


def error_estimate(ks: tuple) -> State:
    """The embedded error estimate sum_i (b_i - b_hat_i) k_i."""
    out = []
    for leaf_index in range(len(ks[0])):
        acc = B_ERROR[0] * ks[0][leaf_index]
        for b, k in zip(B_ERROR[1:], ks[1:]):
            acc = acc + b * k[leaf_index]
        out.append(acc)
    return tuple(out)


def scaled_error(y0: State, y1: State, y_error: State, rtol, atol) -> jax.Array:
    """Per-lane RMS of y_error / (atol + rtol * max(|y0|, |y1|)), diffrax pid.py ``_scale``.

    A NaN in the error becomes inf (diffrax _integrate.py, issue #143) so the step is rejected;
    a leaf of y1 containing NaN is replaced by y0 when forming the tolerance.
    """
    scaled = []
    for a, b, e in zip(y0, y1, y_error):
        e = jnp.where(jnp.isnan(e), jnp.inf, e)
        b = jnp.where(lane(_per_lane_any(jnp.isnan(b)), b), a, b)
        scaled.append(e / (atol + jnp.maximum(jnp.abs(a), jnp.abs(b)) * rtol))
    return rms_norm(tuple(scaled))


def pid_next_interval(t0, t1, error) -> tuple:
    """diffrax PIDController.adapt_step_size with default coefficients (an I-controller).

    Returns (keep, next_t0, next_t1) before clipping to the end of the interval. The factor
    carries no gradient (diffrax stop_gradients it); here no gradient flows through times.
    """
    keep = error < 1
    inv_error = 1 / error
    factor = jnp.clip(
        SAFETY * inv_error ** (1 / ERROR_ORDER),
        jnp.where(keep, 1, FACTOR_MIN),
        jnp.where(keep, FACTOR_MAX, SAFETY),
    )
    dt = (t1 - t0) * factor.astype(t0.dtype)
    next_t0 = jnp.where(keep, t1, t0)
    return keep, next_t0, next_t0 + dt


def constant_num_steps(t_start, t_end, dt0):
    """Number of fixed steps, diffrax ConstantStepSize.init: ceil((t1 - t0) / nextafter(dt0))."""
    return jnp.ceil((t_end - t_start) / next_after(dt0)).astype(jnp.int32)


def constant_next_end(steps_completed, num_steps, t_start, t_end):
    """End of the next fixed step, as a fraction of the interval (diffrax ConstantStepSize:
    avoids compounding rounding from adding dt0 repeatedly); the last step lands on t_end."""
    frac = steps_completed.astype(t_start.dtype) / num_steps.astype(t_start.dtype)
    out = t_start + (t_end - t_start) * frac
    return jnp.where(steps_completed == num_steps, t_end, out)


def clip_to_end(tprev, tnext, t_end, t_end_floor, keep):
    """diffrax _integrate.py ``_clip_to_end``: a step ending within 100 ULP of t_end ends on it
    (after a rejection, half the remaining interval is tried instead). ``keep=True`` (a Python
    bool: fixed steps) leaves out the rejection's branch; a Pallas kernel cannot lower
    operations on a constant predicate."""
    clip = tnext > t_end_floor
    if keep is True:
        return jnp.where(clip, t_end, tnext)
    tclip = jnp.where(keep, t_end, tprev + 0.5 * (t_end - tprev))
    return jnp.where(clip, tclip, tnext)


def fixed_interval(n, num_steps, t_start, t_end, t_end_floor, dt0) -> tuple:
    """(tprev, tnext) of fixed-step iteration ``n`` (int32, scalar or per lane), equal bit for
    bit to what ``attempt_step`` carries there from (t_start, min(t_start + dt0, t_end)).

    Iteration n - 1 (n >= 1) ends where the carry's tnext was, and puts the next end at
    ``constant_next_end(n + 1)`` clipped to t_end within 100 ULP. So a reverse pass (or a
    replay) needs no stored times for fixed steps: it computes them from the iteration."""
    first_end = jnp.minimum(t_start + dt0, t_end)

    def end_of(m):  # the tnext attempt_step sets in iteration m - 2 (a kept step: tprev unused)
        return clip_to_end(None, constant_next_end(m, num_steps, t_start, t_end), t_end, t_end_floor, True)

    tnext = jnp.where(n == 0, first_end, end_of(n + 1))
    tprev = jnp.where(n == 0, t_start, jnp.minimum(jnp.where(n == 1, first_end, end_of(n)), t_end))
    return tprev, tnext


def end_clip_floor(t_end):
    """t_end - 100 ULP: a step ending above this ends on t_end (diffrax ``t1_clip_floor``)."""
    floor = t_end
    for _ in range(100):
        floor = prev_before(floor)
    return floor


def next_after(x):
    """equinox.internal.nextafter: the next float up, flushing 0 to the smallest normal."""
    return jnp.where(x == 0, jnp.finfo(x.dtype).tiny, jnp.nextafter(x, jnp.inf))


def prev_before(x):
    """equinox.internal.prevbefore: the previous float, flushing 0 to -smallest normal."""
    return jnp.where(x == 0, -jnp.finfo(x.dtype).tiny, jnp.nextafter(x, -jnp.inf))


# The first step when dt0 is None. diffrax documents Hairer, Norsett & Wanner's selection
# (pid.py ``_select_initial_step``), but diffeqsolve hands the controller its terms wrapped in
# ``WrapTerm`` and that function returns 0.01 for anything that is not an ``ODETerm``; so every
# adaptive ODE solve in diffrax (0.7.2, checked by tests/test_oracle.py) starts with a step of
# 0.01 in the direction of integration. Equality with diffrax is the contract: we do the same.
AUTO_DT0 = 0.01


class Attempt(NamedTuple):
    """The outcome of one attempted step for every lane (see ``attempt_step``)."""

    ks: tuple  # seven stage increments
    accept: jax.Array  # [L] an accepted step of a running lane
    reject: jax.Array  # [L] a rejected step of a running lane
    nonfinite: jax.Array  # [L] the accepted state or the next step size is not finite
    tprev: jax.Array  # next interval (unchanged for lanes that were not running)
    tnext: jax.Array
    y: State  # next state and FSAL derivative
    f: State


def attempt_step(field: Field, *, adaptive: bool, active, tprev, tnext, y, f, direction, rtol,
                 atol, t_start, t_end, t_end_floor, num_fixed_steps, steps_done, end_field=None) -> Attempt:
    """One iteration of diffrax's integration loop (``_integrate.py`` ``body_fun``) per lane.

    ``active`` marks running lanes. Fixed steps place the next step end at a fraction of the
    interval (``steps_done`` accepted steps so far, shared by all lanes); adaptive steps run
    the PID controller. Times may be [L] or, for fixed steps, shared scalars: then they advance
    unconditionally (finished lanes are masked through ``accept``).
    """
    control = direction * (tnext - tprev)
    y1, ks, f_end = tsit5_step(field, tprev, tnext, y, f, control, end_field)
    if adaptive:
        error = scaled_error(y, y1, error_estimate(ks), rtol, atol)
        keep, next_t0, next_t1 = pid_next_interval(tprev, tnext, error)
    else:
        keep = True  # every fixed step is kept
        next_t0 = tnext
        next_t1 = constant_next_end(steps_done + 2, num_fixed_steps, t_start, t_end)
    new_tprev = jnp.minimum(next_t0, t_end)
    new_tnext = clip_to_end(new_tprev, next_t1, t_end, t_end_floor, keep)
    if jnp.ndim(tprev):
        new_tprev = jnp.where(active, new_tprev, tprev)
        new_tnext = jnp.where(active, new_tnext, tnext)
    accept = active & keep if adaptive else active
    return Attempt(
        ks=ks,
        accept=accept,
        reject=active & ~keep if adaptive else jnp.zeros_like(active),
        nonfinite=(accept & ~all_finite(y1)) | (active & ~jnp.isfinite(new_tnext)),
        tprev=new_tprev,
        tnext=new_tnext,
        y=lane_where(accept, y1, y),
        f=lane_where(accept, f_end, f),
    )


# ---------------------------------------------------------------------------- dense output


def linear_rescale(t0, t, t1):
    """(t - t0) / (t1 - t0), 0 when t0 == t1 (diffrax _misc.py ``linear_rescale``)."""
    same = t0 == t1
    return jnp.where(same, 0, t - t0) / jnp.where(same, 1, t1 - t0)


def dense_weights(theta) -> tuple:
    """The seven weights w_i(theta) of the Tsit5 continuous extension."""
    out = []
    for scale, power, roots, quadratics in DENSE_WEIGHTS:
        w = scale * theta**power
        for r in roots:
            w = w * (theta - r)
        for p, q in quadratics:
            w = w * (theta * theta + p * theta + q)
        out.append(w)
    return tuple(out)


def interpolate(theta, y0: State, ks: tuple) -> State:
    """y(t0 + theta h) = y0 + sum_i w_i(theta) k_i over the step's seven increments."""
    weights = dense_weights(theta)
    out = []
    for leaf_index, y0_leaf in enumerate(y0):
        acc = lane(weights[0], y0_leaf) * ks[0][leaf_index]
        for w, k in zip(weights[1:], ks[1:]):
            acc = acc + lane(w, y0_leaf) * k[leaf_index]
        out.append(y0_leaf + acc)
    return tuple(out)


def interpolate_vjp(theta, y_bar: State, y0_bar: Optional[State] = None, k_bars: Optional[tuple] = None) -> tuple:
    """Add the cotangent of one interpolated output to those of y0 and of the seven k_i
    (or, without them, return its own: y_bar and w_i(theta) y_bar)."""
    weights = dense_weights(theta)
    own = tuple(tuple(lane(w, g) * g for g in y_bar) for w in weights)
    if y0_bar is None:
        return tuple(y_bar), own
    y0_bar = tuple(a + b for a, b in zip(y0_bar, y_bar))
    k_bars = tuple(tuple(kb + x for kb, x in zip(k_bar, o)) for k_bar, o in zip(k_bars, own))
    return y0_bar, k_bars


# ------------------------------------------------------------------------------ reverse step


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def _zero_masked(mask, state: State) -> State:
    return tuple(jnp.where(lane(mask, x), x, jnp.zeros_like(x)) for x in state)


def tsit5_step_vjp(
    field_vjp: FieldVJP,
    t0,
    t1,
    y0: State,
    ks: tuple,
    control,
    lane_mask,
    y1_bar: State,
    f_end_bar: State,
    y0_bar: State,
    k_bars: tuple,
):
    """Reverse sweep of one accepted step from its stored start state and increments.

    ``ks`` holds k_1..k_6 as stored on the tape (k_7 is never needed: it feeds only the error
    estimate, which carries no gradient, and the interpolant, which is linear in it). Stage
    inputs are rebuilt with the same arithmetic as the forward and the field's VJP is applied
    there; no step, controller or error estimate is re-run.

    ``y1_bar`` is the cotangent of the step's result, ``f_end_bar`` the cotangent of the field
    at (t1, y1) deferred from the next step's FSAL stage, ``y0_bar``/``k_bars`` cotangents
    already collected from interpolated outputs of this step. Returns (y0_bar, f0_bar,
    args_bar): f0_bar is the cotangent of the field at (t0, y0), deferred in turn to the
    previous accepted step (whose last stage evaluated it) or to the initial evaluation.

    Lanes where ``lane_mask`` is False (rejected or finished) get zero cotangents into every
    VJP, evaluated at their own start state y0 so that a wild rejected stage cannot turn
    0 * inf into NaN; the caller keeps its carries for those lanes.

    ``k_bars=None``: no interpolated output of this step (``y0_bar`` then must be None too),
    and with ``f_end_bar=None`` as well the field at (t1, y1) gets no cotangent at all, so its
    VJP is not applied (a caller that applies each f0_bar at once to the field at the step's
    start: the jax backend's lean sweep).
    """
    times = stage_times(t0, t1)
    no_outputs = k_bars is None
    if no_outputs:
        assert y0_bar is None, "y0_bar without k_bars: pass zeros for k_bars"
        k_bars = [tuple(jnp.zeros_like(b) for b in y1_bar)] * NUM_STAGES
        y0_bar = tuple(jnp.zeros_like(b) for b in y1_bar)
    k_bars = [tuple(kb) for kb in k_bars]
    y0_bar = tuple(y0_bar)
    args_bar = None

    def pull(i, y_i, f_bar):
        nonlocal args_bar
        y_i = lane_where(lane_mask, y_i, y0)
        y_bar, a_bar = field_vjp(times[i], y_i, _zero_masked(lane_mask, f_bar))
        args_bar = a_bar if args_bar is None else _add(args_bar, a_bar)
        return y_bar

    def into_stage_input(i, y_i_bar):
        nonlocal y0_bar
        y0_bar = tuple(a + b for a, b in zip(y0_bar, y_i_bar))
        for j, a in enumerate(A_LOWER[i - 1]):
            k_bars[j] = tuple(kb + a * g for kb, g in zip(k_bars[j], y_i_bar))

    last = NUM_STAGES - 1
    if no_outputs and f_end_bar is None:
        y1_total_bar = tuple(y1_bar)
    else:
        f_bar = _scale(k_bars[last], control)
        if f_end_bar is not None:
            f_bar = tuple(a + b for a, b in zip(f_bar, f_end_bar))
        y1_total_bar = tuple(a + b for a, b in zip(y1_bar, pull(last, stage_input(last, y0, ks), f_bar)))
    into_stage_input(last, y1_total_bar)
    for i in range(last - 1, 0, -1):
        y_i_bar = pull(i, stage_input(i, y0, ks), _scale(k_bars[i], control))
        into_stage_input(i, y_i_bar)
    f0_bar = _scale(k_bars[0], control)
    return y0_bar, f0_bar, args_bar
