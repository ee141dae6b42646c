"""A field written for one ODE, evaluated on lane tiles: every per-lane array becomes a static
grid of [TB] tiles, one tile per component.

Owns: the interpreter of a field's jaxpr over such grids. Indexing, slicing, reshapes,
broadcasts, stacking, transposes, gathers and scatters with constant indices only move tiles
around the grid (resolved at trace time by applying the same operation to an array of
component ids); matmuls and reductions over component axes unfold into sums of tile
products; elementwise primitives apply tile by tile. What comes out is plain elementwise code
on [TB] tiles, the only kind the Triton lowering takes.

Must not: know about tapes, loops or the Triton lowering; hold step algebra.

A grid is a numpy object array with the per-lane shape of the value; each entry is a JAX value
(a [TB] tile, or a 0-d value shared by the tile) or a numpy scalar (a constant known at trace
time). Values computed only from constants stay constants, so index arithmetic folds away.

A value may instead be a ``Block``: one array holding the whole value, [TB, *shape] per lane or
[*shape] shared. Large shared weight matrices arrive as blocks (``TileField`` decides which), and
what is computed from them stays a block: a matrix product becomes one broadcast product and one
reduction per contracted axis, not one tile operation per weight. That keeps a neural field's
kernel small enough for Triton to compile (its compile time grows faster than the kernel's
size). Blocks take elementwise primitives, dot_general, reductions, broadcasts and reshapes
whose shapes are powers of two (Triton's rule for tensor sizes); any other primitive gets its
block operands split into grids first, which is always correct and costs one reduction per
component.
"""

from __future__ import annotations

import math

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core


class Unsupported(Exception):
    """The field uses something with no static per-lane meaning; the message says what."""


# Elementwise primitives: applied tile by tile. one_minus_square: jax >= 0.11 writes tanh's
# derivative with it (1 - tanh^2), so every field with a tanh has it in its VJP.
ELEMENTWISE = frozenset(
    """abs acos acosh add add_any asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type
    cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow is_finite le lgamma
    digamma log log1p logistic lt max min mul ne neg nextafter not or pow real reduce_precision rem
    round rsqrt select_n sign sin sinh sqrt square sub tan tanh xor and copy copy_p one_minus_square
    shift_left shift_right_logical shift_right_arithmetic population_count""".split()
)

# Primitives that only move data: operand positions that carry data (the rest are indices,
# which must be constants).
MOVEMENT = {
    "broadcast_in_dim": (0,), "reshape": (0,), "squeeze": (0,), "expand_dims": (0,),
    "transpose": (0,), "slice": (0,), "rev": (0,), "concatenate": "all", "stack": "all",
    "unstack": (0,), "split": (0,), "pad": (0, 1), "dynamic_slice": (0,),
    "dynamic_update_slice": (0, 1), "gather": (0,), "scatter": (0, 2),
}

_FOLD = {"reduce_sum": lax.add_p, "reduce_max": lax.max_p, "reduce_min": lax.min_p,
         "reduce_prod": lax.mul_p, "reduce_and": lax.and_p, "reduce_or": lax.or_p}

_CALLS = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "checkpoint", "remat", "custom_lin")

# Primitives bound once as they stand (operands: 0-d grids). Empty: tests add host callbacks
# here to count field evaluations in interpret mode.
PASSTHROUGH = frozenset()

# Sharding annotations: inside a kernel every value is its program's own, so they are the
# identity. jax >= 0.11 writes ``reshard`` into a field traced under a mesh wherever a shared
# value (the time) meets a lane's (seed-nl's 0.2 * t + y, compiled deviceless for an H100).
_LAYOUT = ("reshard", "sharding_constraint", "mesh_cast")

_LOOPS = ("while", "scan", "cond", "fori_loop", "switch")
_RANDOM = ("random_bits", "random_seed", "random_wrap", "random_unwrap", "random_fold_in",
           "random_split", "threefry2x32")


class Block:
    """A value held whole: ``array`` is [TB, *shape] when ``lane`` (one row per lane of the
    tile), else [*shape] (shared by the tile)."""

    def __init__(self, array, lane: bool):
        self.array, self.lane = array, lane

    @property
    def shape(self) -> tuple:
        return tuple(self.array.shape[1:] if self.lane else self.array.shape)

    @property
    def dtype(self):
        return self.array.dtype


def blockable(shape) -> bool:
    """Whether a value of this per-lane shape may be a block: every size a power of two."""
    return all(n >= 1 and n & (n - 1) == 0 for n in shape)


def to_block(value, dtype) -> Block:
    """A grid as one block, built with one select per component (Triton has no concatenate)."""
    if isinstance(value, Block):
        return value
    entries = list(value.reshape(-1))
    tiles = [e for e in entries if not is_constant(e) and jnp.ndim(e) == 1]
    lane = tiles[0].shape if tiles else ()
    if value.ndim == 0:
        entry = entries[0]
        return Block(jnp.asarray(entry, dtype) if is_constant(entry) else entry.astype(dtype), bool(tiles))
    n = len(entries)
    shape = lane + (n,)
    ids = lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
    out = None
    for j, entry in enumerate(entries):
        entry = jnp.asarray(entry, dtype)
        column = lax.broadcast_in_dim(entry, shape, tuple(range(entry.ndim)))
        out = column if out is None else jnp.where(ids == j, column, out)
    return Block(out.reshape(lane + value.shape), bool(tiles))


def to_grid(value) -> np.ndarray:
    """A block as a grid: one masked reduction per component."""
    if not isinstance(value, Block):
        return value
    shape, array = value.shape, value.array
    lead = array.shape[:1] if value.lane else ()
    if not shape:
        return make_grid([array], ())
    n = math.prod(shape)
    flat = array.reshape(lead + (n,))
    ids = lax.broadcasted_iota(jnp.int32, flat.shape, flat.ndim - 1)
    zero = jnp.zeros((), array.dtype)
    entries = [jnp.sum(jnp.where(ids == j, flat, zero), axis=flat.ndim - 1) for j in range(n)]
    return make_grid(entries, shape)


def make_grid(entries, shape) -> np.ndarray:
    """An object array of ``shape`` holding ``entries`` (flat, C order)."""
    grid = np.empty(len(entries), dtype=object)
    for i, entry in enumerate(entries):
        grid[i] = entry
    return grid.reshape(shape)


def constant_grid(value) -> np.ndarray:
    array = np.asarray(value)
    return make_grid(list(array.reshape(-1)), array.shape)


def is_constant(entry) -> bool:
    return isinstance(entry, (np.generic, np.ndarray))


def evaluate(closed_jaxpr, *grids, where: str = "the vector field"):
    """Evaluate a ClosedJaxpr on grids; returns a list of output grids."""
    consts = []
    for c in closed_jaxpr.consts:
        if isinstance(c, jax.core.Tracer):
            raise Unsupported(
                f"{where} closes over a traced array (a value computed inside an outer jit or "
                "transformation); pass it through `args` instead"
            )
        consts.append(constant_grid(c))
    return _eval_jaxpr(closed_jaxpr.jaxpr, consts, list(grids), where)


def _eval_jaxpr(jaxpr, consts, args, where):
    env = {}

    def read(atom):
        if isinstance(atom, jex_core.Literal):
            return constant_grid(np.asarray(atom.val, atom.aval.dtype))
        return env[atom]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        try:
            outs = _eval_eqn(eqn, ins, where)
        except Unsupported as error:
            if getattr(error, "located", False):
                raise
            located = Unsupported(f"{error} ({_source(eqn)})")
            located.located = True
            raise located from None
        for var, value in zip(eqn.outvars, outs):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _source(eqn) -> str:
    try:
        from jax._src import source_info_util

        return "at " + source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 - a location is a courtesy
        return "location unknown"


def _eval_eqn(eqn, ins, where):
    name = eqn.primitive.name
    if name in _LAYOUT:
        return list(ins)
    if name in _LOOPS:
        raise Unsupported(f"`{name}`: loops and data-dependent control flow inside the field have no "
                          "static per-lane form (use jnp.where for branches)")
    if name in _RANDOM or name.startswith("random_"):
        raise Unsupported(f"`{name}`: random numbers inside the field")
    if any(isinstance(g, Block) for g in ins):
        if name in _CALLS:
            return _eval_called(eqn, ins, where)
        out = _block_eqn(eqn, ins)
        if out is not None:
            return [out]
        ins = [to_grid(g) for g in ins]
    if name in PASSTHROUGH:
        out = eqn.primitive.bind(*[g[()] for g in ins], **eqn.params)
        return [make_grid([o], ()) for o in (out if eqn.primitive.multiple_results else [out])]
    if all(is_constant(e) for g in ins for e in g.reshape(-1)) and name not in _CALLS and not eqn.effects:
        folded = _fold_constants(eqn, ins)
        if folded is not None:
            return folded
    if name in _CALLS:
        return _eval_called(eqn, ins, where)
    if name in ELEMENTWISE:
        return [_entrywise(eqn.primitive, eqn.params, ins, [v.aval.dtype for v in eqn.invars])]
    if name in MOVEMENT:
        return _move(eqn, ins)
    if name in _FOLD:
        return [_reduce(_FOLD[name], ins[0], eqn.params["axes"], eqn.invars[0].aval.dtype)]
    if name == "dot_general":
        return [_dot_general(eqn, ins)]
    raise Unsupported(f"`{name}`, which the kernels do not lower")


def _eval_called(eqn, ins, where):
    inner = _called_jaxpr(eqn)
    if isinstance(inner, jex_core.ClosedJaxpr):
        consts = [constant_grid(c) for c in inner.consts]
        return _eval_jaxpr(inner.jaxpr, consts, ins, where)
    return _eval_jaxpr(inner, [], ins, where)


def _block_eqn(eqn, ins):
    """One equation with block operands, as one block; None when it has no block form here."""
    name = eqn.primitive.name
    if eqn.primitive.multiple_results or not blockable(eqn.outvars[0].aval.shape):
        return None
    if not all(blockable(v.aval.shape) for v in eqn.invars):
        return None
    dtypes = [v.aval.dtype for v in eqn.invars]
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if name in ELEMENTWISE:
        blocks = [to_block(g, d) for g, d in zip(ins, dtypes)]
        lane = next((b.array.shape[:1] for b in blocks if b.lane), None)
        full = (lane or ()) + out_shape
        arrays = [_broadcast(b, full) for b in blocks]
        return Block(eqn.primitive.bind(*arrays, **eqn.params), lane is not None)
    if name == "dot_general":
        return _block_dot(eqn, [to_block(g, d) for g, d in zip(ins, dtypes)])
    block = ins[0]
    if not isinstance(block, Block):
        return None
    lead = block.array.shape[:1] if block.lane else ()
    shift = len(lead)
    if name in _FOLD_FN:
        array = block.array
        for axis in sorted(eqn.params["axes"], reverse=True):  # Triton reduces one axis at a time
            array = _FOLD_FN[name](array, axis=axis + shift)
        return Block(array, block.lane)
    if name == "broadcast_in_dim":
        dims = tuple(range(shift)) + tuple(d + shift for d in eqn.params["broadcast_dimensions"])
        return Block(lax.broadcast_in_dim(block.array, lead + out_shape, dims), block.lane)
    if name in ("reshape", "squeeze", "expand_dims"):
        return Block(block.array.reshape(lead + out_shape), block.lane)
    if name == "transpose":
        perm = tuple(range(shift)) + tuple(p + shift for p in eqn.params["permutation"])
        return Block(lax.transpose(block.array, perm), block.lane)
    return None


_FOLD_FN = {"reduce_sum": jnp.sum, "reduce_max": jnp.max, "reduce_min": jnp.min, "reduce_prod": jnp.prod}


def _broadcast(block: Block, full: tuple):
    """A block's array broadcast to ``full`` (numpy's rule on the per-lane shapes; the lane
    axis first)."""
    array = block.array
    if array.shape == full:
        return array
    rank = array.ndim - (1 if block.lane else 0)
    dims = tuple(range(len(full) - rank, len(full)))
    if block.lane:
        dims = (0,) + dims
    return lax.broadcast_in_dim(array, full, dims)


def _block_dot(eqn, blocks):
    """dot_general of blocks as one broadcast product and one reduction per contracted axis,
    laid out as [lane] + lhs axes + rhs free axes, so that no operand needs a transpose (Triton
    moves data between axes through shared memory). When only the operands' order stands in the
    way (a vector times a matrix from the left), they swap. None when no order needs no
    transpose."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    out_dtype = eqn.outvars[0].aval.dtype
    lhs, rhs = blocks
    out = _product(lhs, rhs, lc, rc, lb, rb, out_dtype)
    lf = [d for d in range(len(lhs.shape)) if d not in lc and d not in lb]
    if out is None and not lf and not lb:  # the output is the rhs's free axes either way
        out = _product(rhs, lhs, rc, lc, rb, lb, out_dtype)
    return out


def _product(lhs, rhs, lc, rc, lb, rb, out_dtype):
    nl, nr = len(lhs.shape), len(rhs.shape)
    lf = [d for d in range(nl) if d not in lc and d not in lb]
    rf = [d for d in range(nr) if d not in rc and d not in rb]
    if list(lb) != sorted(lb) or (lf and lb and max(lb) > min(lf)):
        return None  # the output's order (batch, lhs free, rhs free) would need a transpose
    partner = dict(zip(rc, lc)) | dict(zip(rb, lb))
    rhs_dims = [partner[d] if d in partner else nl + rf.index(d) for d in range(nr)]
    if rhs_dims != sorted(rhs_dims):
        return None
    lane = next((b.array.shape[:1] for b in (lhs, rhs) if b.lane), None)
    lead = lane or ()
    shift = len(lead)
    full = lead + tuple(lhs.shape) + tuple(rhs.shape[d] for d in rf)

    def spread(block, dims):
        dims = tuple(d + shift for d in dims)
        if block.lane:
            dims = (0,) + dims
        return lax.broadcast_in_dim(block.array.astype(out_dtype), full, dims)

    product = spread(lhs, range(nl)) * spread(rhs, rhs_dims)
    for axis in sorted(lc, reverse=True):
        product = jnp.sum(product, axis=axis + shift)
    return Block(product, lane is not None)


def _called_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    raise Unsupported(f"`{eqn.primitive.name}` without a jaxpr the kernels can read")


def _fold_constants(eqn, ins):
    """Evaluate an equation whose inputs are all constants at trace time (index arithmetic)."""
    arrays = [_as_array(g, v.aval.dtype) for g, v in zip(ins, eqn.invars)]
    try:
        with jax.ensure_compile_time_eval():
            out = eqn.primitive.bind(*arrays, **eqn.params)
    except Exception:  # noqa: BLE001 - fall back to evaluating entry by entry
        return None
    outs = out if eqn.primitive.multiple_results else [out]
    return [constant_grid(np.asarray(o)) for o in outs]


def _as_array(grid, dtype):
    return np.asarray([np.asarray(e, dtype) for e in grid.reshape(-1)], dtype).reshape(grid.shape)


def _entry(value, dtype, shape):
    value = jnp.asarray(value, dtype)
    return jnp.broadcast_to(value, shape) if value.shape != shape else value


def _apply(primitive, params, entries, dtypes):
    """One elementwise primitive on one component: tiles, shared values or constants."""
    if all(is_constant(e) for e in entries):
        with jax.ensure_compile_time_eval():
            out = primitive.bind(*[jnp.asarray(e, d) for e, d in zip(entries, dtypes)], **params)
        return np.asarray(out)[()]
    if primitive.name == "select_n" and is_constant(entries[0]):
        return _entry(entries[1 + int(entries[0])], dtypes[1], jnp.shape(entries[1 + int(entries[0])]))
    shape = max((jnp.shape(e) for e in entries), key=len)
    return primitive.bind(*[_entry(e, d, shape) for e, d in zip(entries, dtypes)], **params)


def _entrywise(primitive, params, grids, dtypes):
    shape = np.broadcast_shapes(*(g.shape for g in grids))
    grids = [np.broadcast_to(g, shape) for g in grids]
    out = np.empty(shape, dtype=object)
    for index in np.ndindex(shape):
        out[index] = _apply(primitive, params, [g[index] for g in grids], dtypes)
    return out


def _move(eqn, ins):
    """A data-movement primitive, applied to component ids to find where each tile goes."""
    positions = MOVEMENT[eqn.primitive.name]
    data = range(len(ins)) if positions == "all" else positions
    entries, operands = [], []
    for i, (grid, var) in enumerate(zip(ins, eqn.invars)):
        if i in data:
            operands.append(np.arange(len(entries), len(entries) + grid.size, dtype=np.int32).reshape(grid.shape))
            entries.extend(grid.reshape(-1))
        elif all(is_constant(e) for e in grid.reshape(-1)):
            operands.append(_as_array(grid, var.aval.dtype))
        else:
            raise Unsupported(f"`{eqn.primitive.name}` with indices computed from the state or "
                              "arguments (data-dependent indexing)")
    params = dict(eqn.params)
    if "fill_value" in params and params["fill_value"] is not None:
        params["fill_value"] = -1
    with jax.ensure_compile_time_eval():
        out = eqn.primitive.bind(*[jnp.asarray(o) for o in operands], **params)
    outs = out if eqn.primitive.multiple_results else [out]
    result = []
    for ids in outs:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= len(entries)):
            raise Unsupported(f"`{eqn.primitive.name}` reads outside the array")
        result.append(make_grid([entries[i] for i in ids.reshape(-1)], ids.shape))
    return result


def _reduce(primitive, grid, axes, dtype):
    axes = tuple(axes)
    keep = [d for d in range(grid.ndim) if d not in axes]
    moved = np.transpose(grid, keep + list(axes)).reshape([grid.shape[d] for d in keep] + [-1])
    out = np.empty(moved.shape[:-1], dtype=object)
    for index in np.ndindex(out.shape):
        acc = moved[index][0]
        for entry in moved[index][1:]:
            acc = _apply(primitive, {}, [acc, entry], [dtype, dtype])
        out[index] = acc
    return out


def _dot_general(eqn, ins):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = ins
    lf = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    rf = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
    batch = [lhs.shape[d] for d in lb]
    nb, nk = int(np.prod(batch)), int(np.prod([lhs.shape[d] for d in lc]))
    left = np.transpose(lhs, list(lb) + lf + list(lc)).reshape(nb, -1, nk)
    right = np.transpose(rhs, list(rb) + list(rc) + rf).reshape(nb, nk, -1)
    ldt, rdt = eqn.invars[0].aval.dtype, eqn.invars[1].aval.dtype
    out_dtype = eqn.outvars[0].aval.dtype
    mul, add = lax.mul_p, lax.add_p
    out = np.empty((nb, left.shape[1], right.shape[2]), dtype=object)
    for b, i, j in np.ndindex(out.shape):
        acc = None
        for k in range(nk):
            term = _apply(mul, {}, [_cast(left[b, i, k], ldt, out_dtype), _cast(right[b, k, j], rdt, out_dtype)],
                          [out_dtype, out_dtype])
            acc = term if acc is None else _apply(add, {}, [acc, term], [out_dtype, out_dtype])
        out[b, i, j] = acc if acc is not None else np.zeros((), out_dtype)[()]
    return out.reshape(batch + [lhs.shape[d] for d in lf] + [rhs.shape[d] for d in rf])


def _cast(entry, source, target):
    if source == target:
        return entry
    if is_constant(entry):
        return np.asarray(entry, target)[()]
    return entry.astype(target)
