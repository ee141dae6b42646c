"""The vector field as the kernels see it: one function over lane tiles, and its arguments.

Owns: what a field must look like for the kernels (state leaves scalar per lane; arguments
scalar, either one per lane or shared), the check that says so before any device work, how
arguments are loaded inside a program, and how lanes are padded to whole tiles.

Must not: know about tapes, loops or the Triton lowering.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

# Primitives a field may use inside the kernels: elementwise math on lane tiles, and the
# broadcasts, casts and selects JAX emits around it. Anything else (matmuls, slicing,
# reductions, gathers) keeps the field on backend "jax".
ELEMENTWISE = frozenset(
    """abs acos acosh add asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type cos
    cosh div eq erf erf_inv exp exp2 expm1 floor ge gt integer_pow is_finite le lgamma log log1p
    logistic lt max min mul ne neg nextafter not or pow rem round rsqrt select_n sign sin sinh
    sqrt square sub tan tanh xor and broadcast_in_dim copy copy_p jit pjit custom_jvp_call
    custom_vjp_call stop_gradient""".split()
)


class TileProblem(NamedTuple):
    """``field(t, y_leaves, diff_args, nondiff_args)`` on [TB] tiles (or scalars)."""

    field: Callable
    diff_axes: tuple  # 0: per lane ([B] input), None: shared (0-d input)
    nondiff_axes: tuple

    @staticmethod
    def load_args(refs, axes, lanes):
        return [r[lanes] if axis == 0 else r[...] for r, axis in zip(refs, axes)]


def unsupported_reason(problem: TileProblem, y0: tuple, diff: list, nondiff: list, tdtype):
    """Why the kernels cannot run this field (a string), or None when they can."""
    for i, leaf in enumerate(y0):
        if leaf.ndim != 1:
            return f"state leaf {i} has per-lane shape {leaf.shape[1:]}; the kernels take scalar leaves"
    if len({leaf.dtype for leaf in y0}) != 1:
        return "state leaves have different dtypes; the kernels store one tape dtype"
    for kind, leaves, axes in (("differentiable", diff, problem.diff_axes), ("integer", nondiff, problem.nondiff_axes)):
        for i, (leaf, axis) in enumerate(zip(leaves, axes)):
            if (axis == 0 and leaf.ndim != 1) or (axis is None and leaf.ndim != 0):
                return (f"{kind} argument {i} has shape {leaf.shape}; the kernels take scalars, "
                        "one per lane or shared")
    tile = 4
    spec = lambda x, axis: jax.ShapeDtypeStruct((tile,) if axis == 0 else (), x.dtype)  # noqa: E731
    jaxpr = jax.make_jaxpr(problem.field)(
        jax.ShapeDtypeStruct((tile,), tdtype),
        tuple(jax.ShapeDtypeStruct((tile,), y.dtype) for y in y0),
        [spec(x, a) for x, a in zip(diff, problem.diff_axes)],
        [spec(x, a) for x, a in zip(nondiff, problem.nondiff_axes)],
    )
    for name in sorted(_primitives(jaxpr.jaxpr)):
        if name not in ELEMENTWISE:
            return f"the vector field uses `{name}`, which the kernels do not lower"
    return None


def _primitives(jaxpr):
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in _sub_jaxprs(eqn):
            names |= _primitives(sub)
    return names


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        inner = getattr(value, "jaxpr", value)
        if hasattr(inner, "eqns"):
            yield inner


def pad_lanes(problem: TileProblem, padded: int, y0: tuple, diff: list, nondiff: list):
    """Pad lanes to a whole number of tiles by repeating the last lane: padded lanes solve a
    real problem (no NaN can reach shared reductions) and receive zero cotangents."""
    extra = padded - y0[0].shape[0]

    def pad(x):
        return jnp.pad(x, (0, extra), mode="edge") if extra else x

    return (
        tuple(pad(y) for y in y0),
        [pad(x) if a == 0 else x for x, a in zip(diff, problem.diff_axes)],
        [pad(x) if a == 0 else x for x, a in zip(nondiff, problem.nondiff_axes)],
    )
