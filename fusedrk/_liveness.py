"""What the field's VJP reads, decided once per solve from its jaxpr.

Owns: the field's pullback (``pullback``); ``vjp_reads_state``, the one rule by which a
backend leaves the state out of the tape; ``live_inputs``, the dependence rule beneath it,
which AllSaveAdjoint also uses to leave write-only loop buffers out of its residuals.
The reverse sweep rebuilds each stage's input from the stored start state and increments and
hands it to the field's VJP; a field linear in the state (with no differentiable argument
multiplying it) has a VJP that never looks at that input, so storing the state and the six
increments per step is pure memory traffic (the seed: all of its tape).

Must not: know about loops, tapes or kernels; it builds and inspects the field's pullback only.
"""

from __future__ import annotations

import jax
from jax.extend import core as jex_core


def pullback(lane_fn):
    """``(t, y, diff, nondiff, f_bar) -> (y_bar, diff_bar)``: the VJP of the one-lane field
    ``lane_fn(t, y_leaves, diff, nondiff)`` with respect to (y, diff). Traced here to decide the
    tape, and by the kernels to evaluate on lane tiles."""

    def pull(t, y, diff, nondiff, f_bar):
        _, vjp = jax.vjp(lambda y_, d_: lane_fn(t, y_, d_, nondiff), y, diff)
        return vjp(f_bar)

    return pull


def vjp_reads_state(lane_fn, y_spec: tuple, diff_spec: list, nondiff_spec: list, t_spec) -> bool:
    """Whether ``lane_fn(t, y_leaves, diff, nondiff)``'s VJP with respect to (y, diff) uses
    the state y: its value, not only its shape. Conservative: a call or control-flow
    primitive whose outputs are used counts as reading all of its inputs, and a field whose
    VJP cannot be traced (a forward-only solve of a field with a host callback, say) reads
    it: the gradient, if ever taken, reports the real error."""

    try:
        closed = jax.make_jaxpr(pullback(lane_fn))(t_spec, tuple(y_spec), list(diff_spec), list(nondiff_spec),
                                          tuple(y_spec))
    except Exception:  # noqa: BLE001 - see the docstring
        return True
    jaxpr = closed.jaxpr
    y_vars = jaxpr.invars[1: 1 + len(y_spec)]  # the invars flatten (t, y, diff, nondiff, f_bar)
    return any(v in live_inputs(jaxpr) for v in y_vars)


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


def field_reads_state(vector_field, y_lane, args=None) -> bool:
    """``vjp_reads_state`` for a field ``vector_field(t, y, args)`` of one lane whose arguments
    are constants (not differentiated): y_lane is a ShapeDtypeStruct (or array) of one lane's
    state. For the benchmarks' tape accounting."""
    spec = jax.ShapeDtypeStruct(y_lane.shape, y_lane.dtype)
    return vjp_reads_state(lambda t, y, d, n: (vector_field(t, y[0], args),), [spec], [], [],
                           jax.ShapeDtypeStruct((), y_lane.dtype))


def sub_jaxprs(params):
    """The jaxprs nested in an equation's parameters (jit, custom_jvp, cond, while, ...)."""
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "jaxpr") and hasattr(v, "consts"):  # ClosedJaxpr
                yield v.jaxpr
            elif hasattr(v, "eqns"):  # Jaxpr
                yield v
