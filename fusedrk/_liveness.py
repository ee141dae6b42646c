"""What the field's VJP reads, decided once per solve from its jaxpr.

Owns: the field's pullback (``pullback``); ``read_components``, the one rule by which both
backends decide which state components the tape stores;
``live_inputs``, the dependence rule beneath it, which AllSaveAdjoint also uses to leave
write-only loop buffers out of its residuals.
The reverse sweep rebuilds each stage's input from the stored start state and increments and
hands it to the field's VJP; a component of the state that the VJP never looks at (the state
of a field linear in it with no differentiable argument multiplying it: the seed's whole
tape; the velocity of a mechanical system whose force depends on positions only; a running
cost integrated beside the state) needs no bytes on the tape, and the sweep rebuilds it as 0.

Must not: know about loops, tapes or the kernels' programs; it builds and inspects the field's
pullback only (with the kernels' per-component interpreter, ``kernels/_grid.py``, to see
inside an array leaf).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.extend import core as jex_core


def pullback(lane_fn):
    """``(t, y, diff, nondiff, f_bar) -> (y_bar, diff_bar)``: the VJP of the one-lane field
    ``lane_fn(t, y_leaves, diff, nondiff)`` with respect to (y, diff). Traced here to decide the
    tape, and by the kernels to evaluate on lane tiles."""

    def pull(t, y, diff, nondiff, f_bar):
        _, vjp = jax.vjp(lambda y_, d_: lane_fn(t, y_, d_, nondiff), y, diff)
        return vjp(f_bar)

    return pull


# The most scalar inputs (state, arguments and cotangent components of one lane, time) for
# which ``read_components`` looks inside array leaves: it traces the VJP once more with each
# of them a value of its own, on every trace of a solve (2-core VM, warm: pendulum-cost 7-10
# ms, hodgkin-huxley 16-36 ms, against 0.4-0.7 s for the rest of an eager solve's trace and
# dispatch; a 30-component field with a traced 30 x 30 matrix, 961 inputs, 0.38 s). Beyond
# this a field keeps whole leaves: one with many inputs mostly has a matrix reading them all
# (the catalogue's MLP, 293 inputs with its shared weights, reads every component).
MAX_TRACED_COMPONENTS = 256


def read_components(lane_fn, y_spec: tuple, diff_spec: list, nondiff_spec: list, t_spec) -> tuple:
    """Which components of each state leaf ``lane_fn(t, y_leaves, diff, nondiff)``'s VJP with
    respect to (y, diff) uses (its value, not only its shape): per leaf, the sorted flat
    indices (C order over the leaf's one-lane shape).

    Leaf by leaf from the pullback's jaxpr (``live_inputs``); inside a leaf with several
    components, component by component from the same pullback evaluated by the kernels'
    interpreter, which gives every component its own value (``y[0]`` reads one; ``A @ y``
    with a traced A all). Conservative: a call or control-flow primitive whose outputs are
    used counts as reading all of its inputs (inside a leaf the interpreter inlines calls), a
    leaf the interpreter cannot take (a loop in the field, data-dependent indexing, a field
    with over MAX_TRACED_COMPONENTS inputs, no kernels package) is read whole, and a field
    whose VJP cannot be traced (a forward-only solve of a field with a host callback, say)
    reads everything: the gradient, if ever taken, reports the real error."""
    whole = tuple(tuple(range(_size(s))) for s in y_spec)
    try:
        closed = jax.make_jaxpr(pullback(lane_fn))(t_spec, tuple(y_spec), list(diff_spec), list(nondiff_spec),
                                                   tuple(y_spec))
    except Exception:  # noqa: BLE001 - see the docstring
        return whole
    y_vars = closed.jaxpr.invars[1: 1 + len(y_spec)]  # the invars flatten (t, y, diff, nondiff, f_bar)
    live = live_inputs(closed.jaxpr)
    read = tuple(w if v in live else () for v, w in zip(y_vars, whole))
    if all(len(r) <= 1 for r in read):
        return read
    try:
        inside = _read_by_component(closed, y_spec, [*diff_spec, *nondiff_spec], t_spec)
    except Exception:  # noqa: BLE001 - kept whole (see the docstring)
        return read
    return tuple(tuple(j for j in r if inside[i][j]) for i, r in enumerate(read))


def _size(spec) -> int:
    return int(np.prod(spec.shape, dtype=np.int64))


def _read_by_component(closed, y_spec, arg_specs, t_spec) -> list:
    """Per state leaf, a bool per component: whether the pullback ``closed`` (of (t, y, args,
    f_bar)) reads it, each component of every input traced as a value of its own."""
    from fusedrk.kernels import _grid

    specs = [t_spec, *y_spec, *arg_specs, *y_spec]
    if sum(_size(s) for s in specs) > MAX_TRACED_COMPONENTS:
        raise ValueError("too many components to trace one by one")

    def scalars(spec):
        return [jax.ShapeDtypeStruct((), spec.dtype)] * _size(spec)

    def per_component(*flat):
        grids, i = [], 0
        for spec in specs:
            n = _size(spec)
            grids.append(_grid.make_grid(list(flat[i: i + n]), spec.shape))
            i += n
        return [e for g in _grid.evaluate(closed, *grids) for e in _grid.to_grid(g).reshape(-1)]

    program = jax.make_jaxpr(per_component)(*[c for s in specs for c in scalars(s)])
    live = live_inputs(program.jaxpr)
    invars, out, i = program.jaxpr.invars, [], _size(t_spec)
    for spec in y_spec:
        n = _size(spec)
        out.append([v in live for v in invars[i: i + n]])
        i += n
    return out


def live_inputs(jaxpr, outvars=None) -> set:
    """Variables some output of ``jaxpr`` (or some of ``outvars``, when given) depends on
    (dead equations dropped). A while loop is followed carry by carry (``_while_reads``);
    any other equation with a live output reads all of its inputs."""
    live = {v for v in (jaxpr.outvars if outvars is None else outvars) if not isinstance(v, jex_core.Literal)}
    for eqn in reversed(jaxpr.eqns):
        used = [v in live for v in eqn.outvars]
        if not any(used):
            continue
        reads = _while_reads(eqn, used) if eqn.primitive.name == "while" else eqn.invars
        live.update(v for v in reads if not isinstance(v, jex_core.Literal))
    return live


def _while_reads(eqn, used) -> list:
    """The inputs of a ``while`` equation that the outputs marked in ``used`` depend on: the
    carries those outputs need at every iteration (closed under the body's dependences, plus
    what the condition reads), and the constants the body and condition read for them. A
    carry only ever written into itself (a buffer of saved values) is not read by the others."""
    params = eqn.params
    cond, body = params["cond_jaxpr"].jaxpr, params["body_jaxpr"].jaxpr
    nc, nb = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts, init = eqn.invars[:nc], eqn.invars[nc:nc + nb], eqn.invars[nc + nb:]
    cond_live = live_inputs(cond)
    needed = {j for j, u in enumerate(used) if u} | {j for j, v in enumerate(cond.invars[nc:]) if v in cond_live}
    while True:
        body_live = live_inputs(body, [body.outvars[j] for j in sorted(needed)])
        grown = needed | {j for j, v in enumerate(body.invars[nb:]) if v in body_live}
        if grown == needed:
            break
        needed = grown
    return ([c for c, v in zip(cond_consts, cond.invars[:nc]) if v in cond_live]
            + [c for c, v in zip(body_consts, body.invars[:nb]) if v in body_live]
            + [init[j] for j in sorted(needed)])


def field_read_components(vector_field, y_lane, args=None) -> tuple:
    """``read_components`` for a field ``vector_field(t, y, args)`` of one lane with a single
    state leaf and constant (not differentiated) arguments: y_lane is a ShapeDtypeStruct (or
    array) of one lane's state. For the benchmarks' tape accounting (``tape_bytes``'s
    ``tape_live``)."""
    spec = jax.ShapeDtypeStruct(y_lane.shape, y_lane.dtype)
    return read_components(lambda t, y, d, n: (vector_field(t, y[0], args),), [spec], [], [],
                           jax.ShapeDtypeStruct((), y_lane.dtype))


def sub_jaxprs(params):
    """The jaxprs nested in an equation's parameters (jit, custom_jvp, cond, while, ...)."""
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "jaxpr") and hasattr(v, "consts"):  # ClosedJaxpr
                yield v.jaxpr
            elif hasattr(v, "eqns"):  # Jaxpr
                yield v
