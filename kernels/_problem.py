"""The vector field as the kernels see it: one function over lane tiles, and its arguments.

Owns: how a field written for one ODE (state leaves and arguments of any small static shape)
becomes code over [TB] lane tiles (``_grid.py`` evaluates its jaxpr with one tile per
component), the check that says whether it can before any device work, how state leaves and
arguments are split into components and loaded inside a program, and how lanes are padded to
whole tiles.

Must not: know about tapes, loops or the Triton lowering.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fusedrk import _liveness
from fusedrk._shard import repeat_last_lane

from . import _grid

# The most float32 state components one lane may have in the kernels; a float64 component
# counts as two (it takes two 32-bit registers), so float64 lanes take at most 8. Every
# component keeps ~9 values per lane live in the forward loop (state, FSAL derivative, seven
# stages) and more in the reverse. Chosen from the deviceless H100 compile of a cheap N-species
# chain (bench/README.md, "Choosing MAX_STATE_COMPONENTS"; 2026-11-28): bytes of spill stores
# (ptxas -v), forward / reverse kernel,
#   float32, fixed steps:    N = 8: 0 / 0 B;    N = 16: 0 / 576 B;       N = 32: 1,076 / 5,084 B
#   float64, adaptive steps: N = 8: 48 / 656 B; N = 16: 1,628 / 4,852 B
# The rule: the largest power of two whose spill stores stay under 1 KB in both kernels,
# a float64 component counting as two; one doubling further they grow about tenfold (and the
# compile takes over 10 minutes). Fields above the limit run on backend="jax".
MAX_STATE_COMPONENTS = 16


# The most tile operations (equations of the field and its VJP evaluated on lane tiles, counted
# once per evaluation) a field may unfold into. The kernels unroll the field six times per step
# and its VJP six more in the reverse kernel, and the compile time of jax 0.11.2's Triton
# pipeline grows faster than the kernel's size: its coalescing pass walks the whole connected
# loop body once per tiled load or store (quadratic in the body's size). Measured with
# `bench/compile_check.py --group sizes` (an MLP 4 -> H -> 4 with shared weights, float32,
# B = 65,536, deviceless H100, 2 cores, 2026-11-29), forward and reverse together:
#   H = 4: 436 operations, 178 s;   H = 8: 860 operations, 492 s;   H = 16: 1,708 operations, 1,235 s
#   H = 32 (the catalogue's MLP): 3,404 operations, the forward alone 9 minutes and the reverse
#   stopped unfinished after 10 minutes, still in that pass.
# The rule: a compile of about ten minutes at most on such a machine. Every other catalogue field
# is under 800 (Kuramoto with 8 oscillators: 763). Larger fields run on backend="jax".
MAX_TILE_OPERATIONS = 1200


# A shared argument leaf with at least this many components, every size a power of two, is
# loaded whole as one block (``_grid.Block``: a weight matrix), so that products with it are
# block operations instead of one tile operation per weight; smaller leaves are loaded as one
# value per component. 16 keeps every small parameter vector and matrix of the catalogue on
# the per-component path the other fields compile with, and puts the MLP's weights on blocks.
MIN_BLOCK_COMPONENTS = 16


def held_whole(shape, axis) -> bool:
    """Whether an argument leaf of this shape and batch axis is loaded as one block."""
    return axis is None and math.prod(shape) >= MIN_BLOCK_COMPONENTS and _grid.blockable(shape)


def state_component_limit(dtype) -> int:
    """MAX_STATE_COMPONENTS for a state of this dtype: halved for 8-byte components."""
    return MAX_STATE_COMPONENTS * 4 // max(4, jnp.dtype(dtype).itemsize)


class TileProblem(NamedTuple):
    """A lane function ``field(t, y_leaves, diff_args, nondiff_args)`` written for one ODE, and
    how its arguments are batched: 0 per lane (a leading [B] axis), None shared."""

    field: Callable
    diff_axes: tuple
    nondiff_axes: tuple

    def on_tiles(self, y0: tuple, diff: list, nondiff: list, tdtype) -> "TileField":
        """The field over component tiles, for batched inputs shaped like these."""
        lane = lambda x, axis: jax.ShapeDtypeStruct(x.shape[1:] if axis == 0 else x.shape, x.dtype)  # noqa: E731
        y_spec = tuple(jax.ShapeDtypeStruct(y.shape[1:], y.dtype) for y in y0)
        d_spec = [lane(x, a) for x, a in zip(diff, self.diff_axes)]
        n_spec = [lane(x, a) for x, a in zip(nondiff, self.nondiff_axes)]
        t_spec = jax.ShapeDtypeStruct((), tdtype)
        jaxpr = jax.make_jaxpr(self.field)(t_spec, y_spec, d_spec, n_spec)

        vjp_jaxpr = jax.make_jaxpr(_liveness.pullback(self.field))(t_spec, y_spec, d_spec, n_spec, y_spec)
        return TileField(jaxpr, vjp_jaxpr, tuple(s.shape for s in y_spec), tuple(s.shape for s in d_spec),
                         tuple(s.shape for s in n_spec), self.diff_axes, self.nondiff_axes)


class TileField(NamedTuple):
    """A field on lane tiles. Inside the kernels every state leaf and per-lane argument is a
    flat tuple of component tiles [TB]; a shared argument is loaded as its components' values.
    """

    jaxpr: object  # ClosedJaxpr of the lane function
    vjp_jaxpr: object  # ClosedJaxpr of its pullback, (t, y, d, n, f_bar) -> (y_bar, d_bar)
    y_shapes: tuple  # per-lane shape of each state leaf
    diff_shapes: tuple  # per-lane shape (axis 0) or whole shape (shared) of each argument
    nondiff_shapes: tuple
    diff_axes: tuple
    nondiff_axes: tuple

    @property
    def has_blocks(self) -> bool:
        """Whether an argument is held whole (the kernels then launch smaller lane tiles)."""
        return any(held_whole(s, a) for s, a in zip(self.diff_shapes + self.nondiff_shapes,
                                                      self.diff_axes + self.nondiff_axes))

    @property
    def num_components(self) -> int:
        return sum(self.leaf_sizes)

    @property
    def leaf_sizes(self) -> tuple:
        """Components of each state leaf (one lane)."""
        return tuple(math.prod(s) for s in self.y_shapes)

    # -- outside the kernels: batched arrays <-> component arrays

    def components(self, y0: tuple) -> tuple:
        """State leaves [B, *shape] -> one [B] array per component."""
        return tuple(c for y in y0 for c in _columns(y))

    def join(self, comps, lead: tuple) -> tuple:
        """One [*lead] array per component -> leaves [*lead, *shape]."""
        out, i = [], 0
        for shape in self.y_shapes:
            n = math.prod(shape)
            out.append(jnp.stack(comps[i: i + n], axis=-1).reshape(lead + shape))
            i += n
        return tuple(out)

    def arg_inputs(self, diff: list, nondiff: list):
        """Kernel inputs for the arguments: a per-lane leaf gives one [B] array per component,
        a shared leaf one flat array of its components (0-d when it is a scalar); with the
        axis (0 or None) of each input."""
        inputs, axes = [], []
        for leaves, leaf_axes in ((diff, self.diff_axes), (nondiff, self.nondiff_axes)):
            for x, axis in zip(leaves, leaf_axes):
                if axis == 0:
                    cols = _columns(x)
                    inputs += cols
                    axes += [0] * len(cols)
                else:
                    inputs.append(x if x.ndim == 0 or held_whole(x.shape, axis) else x.reshape(-1))
                    axes.append(None)
        return inputs, axes

    def load_args(self, refs, lanes):
        """Inside a program: (diff, nondiff) as lists, per leaf, of component values."""
        refs = list(refs)
        loaded = []
        for shapes, leaf_axes in ((self.diff_shapes, self.diff_axes), (self.nondiff_shapes, self.nondiff_axes)):
            group = []
            for shape, axis in zip(shapes, leaf_axes):
                n = math.prod(shape)
                if axis == 0:
                    group.append([refs.pop(0)[lanes] for _ in range(n)])
                elif held_whole(shape, axis):
                    group.append(_grid.Block(refs.pop(0)[...], lane=False))
                else:
                    ref = refs.pop(0)
                    group.append([ref[...]] if len(shape) == 0 else [ref[j] for j in range(n)])
            loaded.append(group)
        return loaded[0], loaded[1]

    def diff_cotangent_slots(self, dtypes: list) -> list:
        """How the reverse kernel returns each differentiable argument's cotangent (``dtypes``:
        one per argument leaf), one (kind, shape, dtype) slot per component, or per leaf when
        loaded whole: kind "lane", a [B] array per lane; "tile", per-tile partial sums [tiles]
        of a shared component; "whole", per-tile partial sums [tiles, *shape] of a shared leaf
        loaded as one block."""
        slots = []
        for shape, axis, dtype in zip(self.diff_shapes, self.diff_axes, dtypes):
            if held_whole(shape, axis):
                slots.append(("whole", shape, dtype))
            else:
                slots += [("lane" if axis == 0 else "tile", (), dtype)] * math.prod(shape)
        return slots

    def join_diff_cotangents(self, per_slot: list, B: int) -> list:
        """The reverse kernel's cotangent outputs (see ``diff_cotangent_slots``) -> leaves like diff."""
        out, i = [], 0
        for shape, axis in zip(self.diff_shapes, self.diff_axes):
            if held_whole(shape, axis):
                out.append(jnp.sum(per_slot[i], axis=0))
                i += 1
                continue
            n = math.prod(shape)
            comps = per_slot[i: i + n]
            i += n
            if axis == 0:
                out.append(jnp.stack([c[:B] for c in comps], axis=-1).reshape((B,) + shape))
            else:
                out.append(jnp.stack([jnp.sum(c) for c in comps]).reshape(shape))
        return out

    # -- inside the kernels

    def field(self, t, y: tuple, diff: list, nondiff: list) -> tuple:
        """The field on one tile: component tiles in, component tiles out."""
        outs = _grid.evaluate(self.jaxpr, _scalar_grid(t), *self._grids(y, self.y_shapes),
                              *self._arg_grids(diff, self.diff_shapes), *self._arg_grids(nondiff, self.nondiff_shapes))
        shape = jnp.shape(y[0])
        return tuple(_grid._entry(e, y[0].dtype, shape) for g in outs for e in _grid.to_grid(g).reshape(-1))

    def vjp(self, t, y: tuple, diff: list, nondiff: list, f_bar: tuple):
        """(y_bar component tiles, cotangents of the differentiable arguments: a tile [TB] per
        component, or for a leaf loaded whole one array [*shape] summed over the tile).

        A shared argument's per-component cotangent is left per lane: the reverse kernel
        accumulates it per lane over the whole walk and sums over the tile once at the end.
        Summing here, in every pull, put a cross-warp reduction (barriers through shared
        memory) per shared component per stage in the step loop: 3,800 of them for a 4 -> 32
        -> 4 MLP in that form, a fifth of its reverse kernel's operations. A leaf held whole
        is summed here instead: one reduction per leaf and pull, where keeping it per lane
        would hold a weight matrix per lane in registers through the walk."""
        outs = _grid.evaluate(self.vjp_jaxpr, _scalar_grid(t), *self._grids(y, self.y_shapes),
                              *self._arg_grids(diff, self.diff_shapes), *self._arg_grids(nondiff, self.nondiff_shapes),
                              *self._grids(f_bar, self.y_shapes), where="the vector field's VJP")
        shape = jnp.shape(y[0])
        y_bar = tuple(_grid._entry(e, y[0].dtype, shape) for g in outs[: len(self.y_shapes)]
                      for e in _grid.to_grid(g).reshape(-1))
        d_bar = []
        for g, axis, x in zip(outs[len(self.y_shapes):], self.diff_axes, diff):
            if isinstance(x, _grid.Block):
                block = _grid.to_block(g, x.dtype)
                d_bar.append(jnp.sum(block.array, axis=0) if block.lane
                             else _grid._entry(block.array * shape[0], x.dtype, x.shape))
                continue
            for e, like in zip(_grid.to_grid(g).reshape(-1), x):
                d_bar.append(_grid._entry(e, jnp.result_type(like), shape))
        return y_bar, d_bar

    @staticmethod
    def _grids(comps, shapes):
        out, i = [], 0
        for shape in shapes:
            n = math.prod(shape)
            out.append(_grid.make_grid(list(comps[i: i + n]), shape))
            i += n
        return out

    @staticmethod
    def _arg_grids(leaves, shapes):
        return [comps if isinstance(comps, _grid.Block) else _grid.make_grid(list(comps), shape)
                for comps, shape in zip(leaves, shapes)]


def _scalar_grid(t):
    return _grid.make_grid([t], ())


def _columns(x) -> list:
    """[B, *shape] -> one [B] array per component (C order)."""
    flat = x.reshape(x.shape[0], -1)
    return [flat[:, j] for j in range(flat.shape[1])] if x.ndim > 1 else [x]


def unsupported_reason(problem: TileProblem, y0: tuple, diff: list, nondiff: list, tdtype, *,
                       max_operations: int | None = None):
    """Why the kernels cannot run this field (a string), or None when they can.
    ``max_operations`` defaults to MAX_TILE_OPERATIONS (read at call time)."""
    if max_operations is None:
        max_operations = MAX_TILE_OPERATIONS
    if len({leaf.dtype for leaf in y0}) != 1:
        return "state leaves have different dtypes; the kernels store one tape dtype"
    try:
        tiles = problem.on_tiles(y0, diff, nondiff, tdtype)
    except Exception as error:  # noqa: BLE001 - the jax backend will report it properly
        return f"tracing the field failed ({type(error).__name__}: {error})"
    limit = state_component_limit(y0[0].dtype)
    if tiles.num_components > limit:
        return (f"one lane has {tiles.num_components} state components; the kernels take at most "
                f"{limit} in {jnp.dtype(y0[0].dtype).name} (more spill registers)")
    # Evaluate both the field and its VJP on abstract 4-lane tiles: exactly what the kernels do.
    tile = 4
    y = tuple(jax.ShapeDtypeStruct((tile,), y0[0].dtype) for _ in range(tiles.num_components))
    inputs, axes = tiles.arg_inputs(diff, nondiff)
    args = [jax.ShapeDtypeStruct((tile,) if a == 0 else x.shape, x.dtype) for x, a in zip(inputs, axes)]

    def run(t, y, args):
        d, n = tiles.load_args([_Loaded(a, axis) for a, axis in zip(args, axes)], slice(None))
        f = tiles.field(t, y, d, n)
        return f, tiles.vjp(t, y, d, n, f)

    try:
        program = jax.make_jaxpr(run)(jax.ShapeDtypeStruct((tile,), tdtype), y, args)
    except _grid.Unsupported as error:
        return f"the vector field uses {error}"
    size = len(program.jaxpr.eqns)
    if size > max_operations:
        return (f"the vector field and its VJP unfold into {size} operations on lane tiles, more than "
                f"the kernels take ({max_operations}: `fusedrk.kernels._problem.MAX_TILE_OPERATIONS`); "
                "the GPU compile of kernels this large takes from tens of minutes to hours. Shared "
                f"arguments of at least {MIN_BLOCK_COMPONENTS} components whose sizes are all powers of "
                "two (weight matrices) are taken as blocks and unfold into far fewer")
    return None


class _Loaded:
    """Stands in for a kernel ref when checking a field outside a kernel."""

    def __init__(self, value, axis):
        self.value, self.axis = value, axis

    def __getitem__(self, index):
        return self.value if self.axis == 0 or index is Ellipsis else self.value[index]


def pad_lanes(padded: int, *arrays_and_axes):
    """Pad per-lane [B] arrays to ``padded`` lanes by repeating the last lane: padded lanes
    solve a real problem (no NaN can reach shared reductions) and receive zero cotangents.
    Arguments come as (arrays, axes) pairs; shared (axis None) arrays pass through."""
    out = []
    for arrays, axes in arrays_and_axes:
        out.append([repeat_last_lane(x, padded) if a == 0 else x for x, a in zip(arrays, axes)])
    return out
