"""AllSaveAdjoint: a diffrax adjoint that stores every step's internals once and sweeps back once.

Owns: a while loop whose reverse mode stores, for every iteration actually taken, the
residuals of the loop body's linearisation (what ``jax.vjp`` of one solver step keeps: stage
values, controller decisions, save indices) in buffers of ``max_steps`` rows (one row per
dtype), and whose backward pass applies those stored linearisations in reverse order: time
O(n), memory O(max_steps) (on a CPU left uninitialised: see _uninitialised.py), and no
step is ever re-run from an earlier one. ``AllSaveAdjoint`` plugs it into
``diffrax.diffeqsolve`` as the outer loop and as the loop that saves at ``ts`` inside a
step; any explicit solver, step-size controller and SaveAt that diffrax supports work.
Under ``jax.vmap`` on XLA:CPU (``store="auto"``) the outer loop stores each iteration's
inputs instead of its residuals and linearises each iteration again, from its own inputs, in
the backward pass: still one sweep, no iteration re-run from another one.

Compared with diffrax's adjoints: ``RecursiveCheckpointAdjoint`` stores only step end states
and recomputes each step in the backward pass; ``DirectAdjoint`` also avoids recomputation but
differentiates through a bounded loop of nested scans sized by ``max_steps``. ``fusedrk.solve``
is the same idea specialised to Tsit5 on batches, with a smaller tape (six stage increments).

Must not: know about Tsit5 or fusedrk's tape layout; it is generic over the loop body.
"""

from __future__ import annotations

import functools as ft
import math

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
from diffrax._heuristics import is_sde
from diffrax._solver.base import AbstractWrappedSolver, vector_tree_dot
from diffrax._solver.runge_kutta import AbstractERK, AbstractRungeKutta, ButcherTableau
from jax import lax
from jax.interpreters import batching, mlir

from . import _liveness, _reference, _uninitialised
from ._solve import _device_memory_bytes


class _Recorder:
    """Receives at trace time the bytes stored per step, alone and per lane under jax.vmap
    (see ``bytes_per_step``), and whether the loop runs packed when not vmapped (see
    ``_packed_loop``)."""

    def __init__(self):
        self.bytes_per_step = None
        self.bytes_per_step_vmapped = None
        self.packed = None


def _split(tree):
    """Leaves of a loop carry in three groups: float arrays (differentiated), other arrays
    (counters, flags: carried, not differentiated) and non-arrays (static)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    kinds = tuple("f" if eqx.is_inexact_array(x) else ("a" if eqx.is_array(x) else "s") for x in leaves)
    floats = [x for x, k in zip(leaves, kinds) if k == "f"]
    arrays = [x for x, k in zip(leaves, kinds) if k == "a"]
    static = tuple(x for x, k in zip(leaves, kinds) if k == "s")
    return floats, arrays, (treedef, kinds, static)


def _merge(floats, arrays, meta):
    treedef, kinds, static = meta
    floats, arrays, static = iter(floats), iter(arrays), iter(static)
    leaves = [next(floats) if k == "f" else (next(arrays) if k == "a" else next(static)) for k in kinds]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _residual_bytes(shapes) -> int:
    return sum(jnp.dtype(s.dtype).itemsize * math.prod(s.shape) for s in shapes)


# A select that only exists under jax.vmap. Inside the loops below a lane's "still going" flag
# is always true when nothing is vmapped (the loop runs while any lane goes on, and there is
# one lane), so keeping a stopped lane's carry costs a copy of the carry per iteration for
# nothing: 27 ms of the seed's 8,000 steps. This primitive is `new` unbatched and becomes
# jnp.where(pred, new, old) when batched, where lanes do stop at different iterations.
_lane_select_p = jax_core.Primitive("fusedrk_allsave_lane_select")
_lane_select_p.def_impl(lambda pred, new, old: new)
_lane_select_p.def_abstract_eval(lambda pred, new, old: new)
mlir.register_lowering(_lane_select_p, mlir.lower_fun(lambda pred, new, old: new, multiple_results=False))


def _lane_select_batched(args, dims):
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    pred, new, old = (batching.bdim_at_front(x, d, size) for x, d in zip(args, dims))
    pred = pred.reshape(pred.shape + (1,) * (new.ndim - pred.ndim))
    return jnp.where(pred, new, old), 0


batching.primitive_batchers[_lane_select_p] = _lane_select_batched


def _lane_select(pred, new, old):
    """``new`` where this lane's ``pred`` holds (always, unless vmapped), else ``old``."""
    return _lane_select_p.bind(pred, new, old)


def _packer(shapes, small: int = 1024):
    """Buffers for a list of residuals: those of at most ``small`` elements packed into one
    flat row per dtype, each larger one in a buffer of its own; ``pack`` and ``unpack`` map
    between the list and the rows. Why: a step of diffrax's loop has dozens of scalar
    residuals, and one write per iteration beats dozens; a large residual (a stage of a big
    state) would only be copied once more by packing."""
    dtypes = sorted({jnp.dtype(s.dtype) for s in shapes if math.prod(s.shape) <= small}, key=str)
    packed = [math.prod(s.shape) <= small for s in shapes]
    row_shapes = [(d, (sum(math.prod(s.shape) for s, p in zip(shapes, packed) if p and jnp.dtype(s.dtype) == d),))
                  for d in dtypes]
    row_shapes += [(jnp.dtype(s.dtype), tuple(s.shape)) for s, p in zip(shapes, packed) if not p]

    def pack(leaves):
        rows = [jnp.concatenate([jnp.ravel(x) for x, p in zip(leaves, packed) if p and x.dtype == d]) for d in dtypes]
        return rows + [x for x, p in zip(leaves, packed) if not p]

    def unpack(rows):
        offsets = {d: 0 for d in dtypes}
        by_dtype = dict(zip(dtypes, rows))
        large = iter(rows[len(dtypes):])
        out = []
        for s, p in zip(shapes, packed):
            if not p:
                out.append(next(large))
                continue
            d, n = jnp.dtype(s.dtype), math.prod(s.shape)
            out.append(by_dtype[d][offsets[d]:offsets[d] + n].reshape(s.shape))
            offsets[d] += n
        return out

    return pack, unpack, row_shapes


# XLA:CPU runs the operations of a computation (a loop body, a branch) one after another
# when every buffer they touch holds at most this many bytes, or when there are at most 8 of
# them (constants of xla::cpu::ThunkExecutor, not configurable); otherwise it dispatches them
# as a dataflow graph over its threads, which for the dozens of scalar operations of a small
# solver step costs more than the operations themselves (a thread handoff is microseconds).
# A loop body that writes a row of a residual buffer sized by max_steps is always dispatched.
_SEQUENTIAL_BYTES = 512


def _nbytes(aval) -> int:
    dtype = getattr(aval, "dtype", None)
    return math.prod(getattr(aval, "shape", ())) * (dtype.itemsize if dtype is not None else 0)


def _small_values(jaxpr) -> bool:
    """Whether every value ``jaxpr`` (and every jaxpr nested in it) takes or makes fits in
    ``_SEQUENTIAL_BYTES``."""
    if any(_nbytes(v.aval) > _SEQUENTIAL_BYTES for v in (*jaxpr.invars, *jaxpr.constvars)):
        return False
    for eqn in jaxpr.eqns:
        if any(_nbytes(v.aval) > _SEQUENTIAL_BYTES for v in eqn.outvars):
            return False
        if not all(_small_values(sub) for sub in _liveness.sub_jaxprs(eqn.params)):
            return False
    return True


def _on_its_own(fn, operand, always_true, lanes):
    """``fn(operand)`` as a conditional's branch of its own (``_reference._isolated``) when its
    values are all small (``_small_values``): XLA:CPU then runs the branch's operations one
    after another, while the loop body around it (a handful of operations, the buffer writes among them) is too short
    to be dispatched. ``always_true`` must be true and unknown to the compiler; ``lanes``, a
    boolean batched under ``jax.vmap``, makes the predicate batched there, so that the
    conditional becomes the branch computed inline (vmapped, the values are not small)."""
    if not _small_values(jax.make_jaxpr(fn)(operand).jaxpr):
        return fn(operand)
    return _reference._isolated(fn, operand, _lane_select(lanes, always_true, always_true))


def _unbatched_or_vmapped(unbatched, batched):
    """``unbatched(*args)``; under ``jax.vmap``, ``jax.vmap(batched(in_batched))(*args)`` over
    the batched arguments, every output batched. For code traced once without knowing
    whether it will be vmapped (a custom_vjp's rules, diffrax's jit): a step that is small
    alone is not small on a batch (see ``_packed_loop``)."""
    fn = jax.custom_batching.custom_vmap(unbatched)

    def rule(axis_size, in_batched, *args):
        in_axes = tuple(jax.tree_util.tree_map(lambda b: 0 if b else None, b) for b in in_batched)
        out = jax.vmap(batched(in_batched), in_axes=in_axes, axis_size=axis_size)(*args)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    fn.def_vmap(rule)
    return fn


class _Bytes:
    """Small arrays of fixed shapes as vectors of bytes and back, bit for bit: a loop that
    carries one vector copies it once per iteration (XLA copies each carried leaf a branch
    returns), and a row of bytes is one write. ``pieces`` splits the bytes at leaf boundaries
    into vectors of at most ``_SEQUENTIAL_BYTES`` (one leaf may be longer); ``spans`` gives
    their (start, length) in the whole."""

    def __init__(self, specs):
        self.specs = [(tuple(s.shape), jnp.dtype(s.dtype)) for s in specs]
        sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in self.specs]
        self.size = sum(sizes)
        self.groups, self.spans = [], []
        start = 0
        for i, n in enumerate(sizes):
            if not self.groups or self.spans[-1][1] + n > _SEQUENTIAL_BYTES:
                self.groups.append([])
                self.spans.append((start, 0))
            self.groups[-1].append(i)
            self.spans[-1] = (self.spans[-1][0], self.spans[-1][1] + n)
            start += n

    @staticmethod
    def takes(specs) -> bool:
        return all(jnp.dtype(s.dtype) == jnp.bool_
                   or (jnp.issubdtype(s.dtype, jnp.integer) or jnp.issubdtype(s.dtype, jnp.floating))
                   and jnp.dtype(s.dtype).itemsize in (1, 2, 4, 8)
                   for s in specs)

    def _to(self, i, x):
        dtype = self.specs[i][1]
        x = jnp.asarray(x, dtype)
        return (x.astype(jnp.uint8) if dtype == jnp.bool_ else lax.bitcast_convert_type(x, jnp.uint8)).reshape(-1)

    def _from(self, i, b):
        shape, dtype = self.specs[i]
        if dtype == jnp.bool_:
            return (b != 0).reshape(shape)
        if dtype.itemsize == 1:
            return lax.bitcast_convert_type(b, dtype).reshape(shape)
        return lax.bitcast_convert_type(b.reshape(shape + (dtype.itemsize,)), dtype)

    def pieces(self, leaves):
        return [jnp.concatenate([self._to(i, leaves[i]) for i in group]) for group in self.groups]

    def from_pieces(self, pieces):
        out = [None] * len(self.specs)
        for group, piece in zip(self.groups, pieces):
            offset = 0
            for i in group:
                n = math.prod(self.specs[i][0]) * self.specs[i][1].itemsize
                out[i] = self._from(i, piece[offset:offset + n])
                offset += n
        return out

    def pack(self, leaves):
        pieces = self.pieces(leaves)
        return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces or [jnp.zeros((0,), jnp.uint8)])

    def unpack(self, vector):
        return self.from_pieces([vector[start:start + n] for start, n in self.spans])


def _spec(x):
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def _scalars_to_arrays(tree):
    """Python scalars in a loop carry become arrays, as ``lax.while_loop`` makes them (diffrax's
    initial state holds a few, and its loop body may return them either way)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x) if isinstance(x, (bool, int, float, complex, np.generic)) else x, tree
    )


def all_save_while_loop(cond_fun, body_fun, init_val, *, max_steps: int, recorder=None, store_inputs=False,
                        store="auto"):
    """``lax.while_loop`` (bounded by max_steps) whose reverse mode stores every iteration's
    linearisation (or its inputs: ``store``) and replays no iteration from an earlier one.

    ``store`` (see ``AllSaveAdjoint``): "residuals", each iteration's linearisation; "inputs",
    each iteration's inputs (less the write-only buffers), linearised again one by one in the
    backward pass; "auto", inputs under ``jax.vmap`` on XLA:CPU, residuals otherwise.

    With ``store_inputs`` the forward pass keeps only the loop's inputs (less the write-only
    buffers: see ``_write_only``) and the number of iterations, and the backward pass, from
    the last iteration down, re-runs the body from the inputs up to that iteration and applies
    its pullback: quadratic in the iterations, so only for loops of a few. For the loop that
    saves at ``ts`` inside each step: its body only interpolates (no field evaluation), it
    usually runs zero or one iteration, and stored in full it would keep ``len(ts)`` rows in
    every outer step's residuals (2 kB of the 2.3 kB a step of a 2-component solve saving 11
    times stored)."""
    if store not in ("auto", "residuals", "inputs"):
        raise ValueError(f"store must be 'auto', 'residuals' or 'inputs', got {store!r}")
    init_val = _scalars_to_arrays(init_val)
    floats0, arrays0, meta = _split(init_val)

    def body_leaves(floats, arrays):
        out_floats, out_arrays, out_meta = _split(_scalars_to_arrays(body_fun(_merge(floats, arrays, meta))))
        assert out_meta[:2] == meta[:2], "the loop body changed the structure of its carry"
        return out_floats, out_arrays

    # Every traced value the body closes over (the solver's args among them) becomes an explicit
    # input: floats are differentiated, the rest only carried; nothing traced may stay closed
    # over, or the stored pullbacks could not be rebuilt in the backward trace. Concrete
    # constants (Butcher tableaux) stay constants: differentiating them would make every step
    # store its stages once per stage, for a gradient nobody asked for.
    closed, out_shape = jax.make_jaxpr(body_leaves, return_shape=True)(floats0, arrays0)
    out_tree = jax.tree_util.tree_structure(out_shape)
    const_kind = [
        ("f" if eqx.is_inexact_array(c) else "o") if isinstance(c, jax.core.Tracer) else "c" for c in closed.consts
    ]
    float_consts = [c for c, k in zip(closed.consts, const_kind) if k == "f"]
    other_consts = [c for c, k in zip(closed.consts, const_kind) if k == "o"]
    fixed_consts = [c for c, k in zip(closed.consts, const_kind) if k == "c"]

    # Floats the body hands back untouched (with SaveAt(t1), the buffers of saved outputs) are
    # not carried: they join the constants. Cheaper, and needed: carried, such a float came out
    # of the loop unbatched under jax.vmap while its tangent was batched, and grad(vmap(...))
    # of a solve saving only t1 failed to trace (tests/test_allsave.py::test_works_under_vmap).
    num_floats, num_consts = len(floats0), len(float_consts)
    invars, outvars = closed.jaxpr.invars, closed.jaxpr.outvars
    untouched = {i for i in range(num_floats) if outvars[i] is invars[i]}
    moving0 = [x for i, x in enumerate(floats0) if i not in untouched]
    float_consts = float_consts + [x for i, x in enumerate(floats0) if i in untouched]

    def all_floats(moving, consts):
        moving, kept = iter(moving), iter(consts[num_consts:])
        return [next(kept) if i in untouched else next(moving) for i in range(num_floats)]

    def step(moving, float_consts, arrays, other_consts):
        groups = {"f": iter(float_consts), "o": iter(other_consts), "c": iter(fixed_consts)}
        consts = [next(groups[k]) for k in const_kind]
        flat = jax_core.jaxpr_as_fun(jax_core.ClosedJaxpr(closed.jaxpr, consts))(
            *all_floats(moving, float_consts), *arrays
        )
        out_floats, out_arrays = jax.tree_util.tree_unflatten(out_tree, flat)
        return [x for i, x in enumerate(out_floats) if i not in untouched], out_arrays

    cond_closed = jax.make_jaxpr(lambda f, a: cond_fun(_merge(f, a, meta)))(floats0, arrays0)

    def cond(n, moving, consts, arrays, cond_consts):
        keep_going = jax_core.jaxpr_as_fun(jax_core.ClosedJaxpr(cond_closed.jaxpr, cond_consts))(
            *all_floats(moving, consts), *arrays
        )
        return (n < max_steps) & keep_going[0]

    def linearised(floats, consts, arrays, other_consts):
        # Only the floats are primals; the integer carry (step counters, flags) and integer
        # constants are closed over, known to the linearisation and never differentiated.
        out_floats, pullback, out_arrays = jax.vjp(
            lambda f, k: step(f, k, arrays, other_consts), floats, consts, has_aux=True
        )
        return out_floats, out_arrays, pullback

    pullback_def = []  # the pullback's structure, set when the recording loop is traced
    small = False  # set below for the outer loop: whether it runs as _packed_loop
    unbatched_mode = vmapped_mode = None  # set below for the outer loop: what it stores

    def loop(floats, consts, arrays, other_consts, cond_consts, buffers, packed=False, record="residuals"):
        """The iterations; with ``buffers``, each also writes its linearisation's residuals
        (``record="inputs"``: its inputs) into row n (one row per dtype: a few writes per
        iteration, not one per residual).

        Under jax.vmap the lanes stop at different iterations. The loop runs while any lane
        goes on, with one shared counter n, and a lane that has stopped keeps its carry (its
        rows are written but never read): a per-lane trip test would make JAX's batching
        rule select between old and new copies of every buffer each iteration. The primal
        (``plain``) runs this same loop so that both batch their carries alike: when they did
        not, grad(vmap(...)) with adaptive steps failed to trace."""

        def advance(n, lane_n, f, a, record):
            going = cond(n, f, consts, a, cond_consts)
            if record == "residuals":
                out_f, out_a, pullback = linearised(f, consts, a, other_consts)
                residuals, treedef = jax.tree_util.tree_flatten(pullback)
                pullback_def[:] = [treedef]
            else:
                (out_f, out_a) = step(f, consts, a, other_consts)
                residuals = [*(f[i] for i in live), *a] if record == "inputs" else None
            f = [_lane_select(going, new, old) for new, old in zip(out_f, f)]
            a = [_lane_select(going, new, old) for new, old in zip(out_a, a)]
            return lane_n + going.astype(jnp.int32), f, a, residuals

        def any_going(n, f, a):
            return eqxi.unvmap_any(cond(n, f, consts, a, cond_consts))

        if packed:
            return _packed_loop(floats, arrays, buffers, advance, any_going)

        def body(c):
            n, lane_n, f, a, bufs = c
            lane_n, f, a, residuals = advance(n, lane_n, f, a, record if bufs is not None else None)
            if bufs is not None:
                rows = pack(residuals) if record == "residuals" else in_pack(residuals)
                bufs = [b.at[n].set(x) for b, x in zip(bufs, rows)]
            return n + 1, lane_n, f, a, bufs

        _, lane_n, floats, arrays, buffers = lax.while_loop(
            lambda c: any_going(c[0], c[2], c[3]), body, (jnp.int32(0), jnp.int32(0), floats, arrays, buffers)
        )
        return floats, arrays, lane_n, buffers

    def _packed_loop(floats, arrays, buffer, advance, any_going):
        """The recording ``loop`` for a small step (see ``small``): the carry as one vector of
        bytes, the residuals as one row of bytes, the step as a branch of its own. The loop body is then
        a few operations and the branch's values are all small, so XLA:CPU runs both without
        dispatching (Van der Pol, 2 components, Dopri5, 164 steps, max_steps 4,096:
        jit(value_and_grad) 4.7 ms before, 2.2 ms now; README "For diffrax users")."""
        specs = [jax.ShapeDtypeStruct((), jnp.int32), *map(_spec, floats), *map(_spec, arrays)]
        carry, nf = _Bytes(specs), len(floats)

        def split(words):
            lane_n, *leaves = carry.unpack(words)
            return lane_n, leaves[:nf], leaves[nf:]

        def body(c):
            n, words, buf = c

            def one(words):
                lane_n, f, a, residuals = advance(n, *split(words), "residuals")
                return carry.pack([lane_n, *f, *a]), residual_bytes.pieces(residuals)

            words, pieces = _on_its_own(one, words, n < max_steps, words[0] >= 0)
            row = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)
            return n + 1, words, lax.dynamic_update_slice(buf, row[None], (n, jnp.int32(0)))

        def going(c):
            n, words, _ = c
            _, f, a = split(words)
            return any_going(n, f, a)

        words = carry.pack([jnp.int32(0), *floats, *arrays])
        _, words, buffer = lax.while_loop(going, body, (jnp.int32(0), words, buffer))
        lane_n, floats, arrays = split(words)
        return floats, arrays, lane_n, buffer

    def plain(floats, consts, arrays, other_consts, cond_consts):
        def run_loop(*args):
            return loop(*args, None)[:2]

        if unbatched_mode == vmapped_mode:
            return run_loop(floats, consts, arrays, other_consts, cond_consts)
        # Storing nothing, the general loop already runs sequentially on a small step (packed
        # it took 5x as long). Wrapped so that under jax.vmap its outputs are batched as
        # run_fwd's are (it chooses what to store there): all of them.
        return _unbatched_or_vmapped(run_loop, lambda _: run_loop)(floats, consts, arrays, other_consts, cond_consts)

    if store_inputs:
        write_only = _write_only(step, moving0, float_consts, arrays0, other_consts)
        run_again = jax.custom_vjp(plain)

        def run_again_fwd(floats, consts, arrays, other_consts, cond_consts):
            out_floats, out_arrays, lane_n, _ = loop(floats, consts, arrays, other_consts, cond_consts, None)
            kept = [None if i in write_only else x for i, x in enumerate(floats)]
            # Not the loop's decisions: iteration i ran in a lane iff i < lane_n.
            return (out_floats, out_arrays), (lane_n, kept, consts, arrays, other_consts)

        def run_again_bwd(residuals, cotangents):
            lane_n, kept, consts, arrays, other_consts = residuals
            floats_bar = list(cotangents[0])

            def again(_):
                # A write-only buffer's value reaches no pullback and no other output: zeros
                # stand in for it at every iteration, so the re-run carries only the other
                # floats and the integers, and the work that only feeds the buffers (the
                # interpolation, the saved values) drops out of it. (Lanes here are unbatched:
                # custom_vjp batches this rule.)
                zeros = [jnp.zeros(m.shape, m.dtype) for m in moving0]
                live = [i for i, x in enumerate(kept) if x is not None]

                def with_zeros(f_live):
                    f = list(zeros)
                    for i, x in zip(live, f_live):
                        f[i] = x
                    return f

                def pull_back(c):
                    # Iteration j's carry, re-run from the inputs (quadratic in the iterations
                    # of one step, which are zero or one but for a step past several save times;
                    # no rows to fill, write and read), then its pullback.
                    j, f_bar, k_bar = c

                    def advance(i, carry):
                        f, a = carry
                        out_f, out_a = step(with_zeros(f), consts, a, other_consts)
                        going = i < lane_n
                        return ([_lane_select(going, out_f[k], old) for k, old in zip(live, f)],
                                [_lane_select(going, new, old) for new, old in zip(out_a, a)])

                    f_live, a_j = lax.fori_loop(jnp.int32(0), j, advance, ([kept[i] for i in live], list(arrays)))
                    f_j = with_zeros(f_live)
                    _, pullback = jax.vjp(lambda f, k: step(f, k, a_j, other_consts)[0], f_j, consts)
                    step_f_bar, step_k_bar = pullback(f_bar)
                    taken = j < lane_n
                    f_bar = [_lane_select(taken, new, old) for new, old in zip(step_f_bar, f_bar)]
                    k_bar = jax.tree_util.tree_map(lambda k, s: _lane_select(taken, k + s, k), k_bar, step_k_bar)
                    return j - 1, f_bar, k_bar

                k_bar = jax.tree_util.tree_map(jnp.zeros_like, consts)
                last = eqxi.unvmap_max(lane_n) - 1
                _, f_bar, k_bar = lax.while_loop(lambda c: c[0] >= 0, pull_back, (last, floats_bar, k_bar))
                return f_bar, k_bar

            def untouched(_):  # no iteration ran: the loop was the identity
                return floats_bar, jax.tree_util.tree_map(jnp.zeros_like, consts)

            # Most steps save nothing; then the loop is not run again (a real branch, also
            # under jax.vmap: the test is over all lanes).
            floats_bar, consts_bar = lax.cond(eqxi.unvmap_any(lane_n > 0), again, untouched, None)
            return floats_bar, consts_bar, None, None, None

        run_again.defvjp(run_again_fwd, run_again_bwd)
        moving, arrays = run_again(moving0, float_consts, arrays0, other_consts, cond_closed.consts)
        return _merge(all_floats(moving, float_consts), arrays, meta)

    res_shapes = jax.eval_shape(
        lambda *x: jax.tree_util.tree_leaves(linearised(*x)[2]), moving0, float_consts, arrays0, other_consts
    )
    per_step = _residual_bytes(res_shapes)
    pack, unpack, row_shapes = _packer(res_shapes)
    residual_bytes = _Bytes(res_shapes)
    # A small step: on XLA:CPU, every value of one linearised step, the carry and the
    # cotangents fit in _SEQUENTIAL_BYTES (a few components). Decided on the unbatched trace;
    # under jax.vmap the loops take the general path (see _unbatched_or_vmapped).
    carry_specs = [jax.ShapeDtypeStruct((), jnp.int32), *map(_spec, moving0), *map(_spec, arrays0)]
    bar_specs = [*map(_spec, moving0), *map(_spec, float_consts)]
    small = (
        jax.default_backend() == "cpu"
        and _Bytes.takes([*carry_specs, *res_shapes])
        and _residual_bytes(carry_specs) <= _SEQUENTIAL_BYTES
        and _residual_bytes(bar_specs) <= _SEQUENTIAL_BYTES
        and _small_values(jax.make_jaxpr(linearised)(moving0, float_consts, arrays0, other_consts).jaxpr)
        # the backward loop's body: a slice per piece of the row, the branch, the counter
        and len(residual_bytes.spans) <= 4
    )
    # What an iteration stores, alone and under jax.vmap: its residuals (as one row of bytes
    # when small), or its inputs. Inputs under jax.vmap on XLA:CPU: there every lane writes its
    # own rows to memory touched for the first time (XLA's scratch for large buffers is fresh
    # from the OS on every call: ~2.4 us per 4 kB page on the development machine), and a
    # linearised step of a 20-component Van der Pol ring stores 4.4 kB of residuals against
    # 0.4 kB of inputs; under jax.vmap over 64 lanes (max_steps 256) its gradient took 88.5 ms
    # with residuals, 31.6 ms with inputs, against 39.8 ms for
    # RecursiveCheckpointAdjoint(checkpoints=max_steps) (README "For diffrax users").
    # "auto" stores inputs only where they are fewer bytes than the residuals (not so for a
    # field linear in the state, whose linearisation keeps little).
    input_bytes = None
    if store == "inputs" or (store == "auto" and jax.default_backend() == "cpu"):
        write_only = _write_only(step, moving0, float_consts, arrays0, other_consts)
        live = [i for i in range(len(moving0)) if i not in write_only]
        input_shapes = [*(_spec(moving0[i]) for i in live), *map(_spec, arrays0)]
        in_pack, in_unpack, in_row_shapes = _packer(input_shapes)
        input_bytes = _residual_bytes(input_shapes)
    unbatched_mode = "inputs" if store == "inputs" else ("packed" if small else "residuals")
    vmapped_mode = "inputs" if store == "inputs" or (input_bytes is not None and input_bytes < per_step) else "residuals"
    modes = {unbatched_mode, vmapped_mode}
    if recorder is not None:
        recorder.packed = unbatched_mode == "packed"
        recorder.bytes_per_step = input_bytes if unbatched_mode == "inputs" else per_step
        recorder.bytes_per_step_vmapped = input_bytes if vmapped_mode == "inputs" else per_step
    stored = {mode: input_bytes if mode == "inputs" else per_step for mode in modes}
    run = jax.custom_vjp(plain)

    def run_fwd(floats, consts, arrays, other_consts, cond_consts):
        # The rows of both modes are allocated when the choice is left to jax.vmap (on a CPU,
        # uninitialised: address space, and one set is written).
        per_step_allocated = sum(stored.values())
        needed, available = per_step_allocated * max_steps, _device_memory_bytes()
        if needed > available:
            raise MemoryError(
                f"AllSaveAdjoint needs {per_step_allocated} bytes per step x max_steps={max_steps} = "
                f"{needed / 2**30:.2f} GiB of stored rows, more than the device's {available / 2**30:.2f} "
                "GiB; lower max_steps or use diffrax.RecursiveCheckpointAdjoint"
            )
        # Rows past the last iteration are never read: left unwritten, they cost no time.
        specs = {
            "residuals": lambda: [((max_steps,) + shape, dtype) for dtype, shape in row_shapes],
            "packed": lambda: [((max_steps, residual_bytes.size), jnp.uint8)],
            "inputs": lambda: [((max_steps,) + shape, dtype) for dtype, shape in in_row_shapes],
        }
        order = sorted(modes)
        made = iter(_uninitialised.buffers([x for mode in order for x in specs[mode]()],
                                           like=[*floats, *jax.tree_util.tree_leaves(consts)]))
        buffers = {mode: [next(made) for _ in specs[mode]()] for mode in order}

        def run_as(mode):
            def go(floats, consts, arrays, other_consts, cond_consts, buffers):
                rows = buffers[mode][0] if mode == "packed" else buffers[mode]
                floats, arrays, lane_n, rows = loop(floats, consts, arrays, other_consts, cond_consts, rows,
                                                    packed=mode == "packed",
                                                    record="inputs" if mode == "inputs" else "residuals")
                return floats, arrays, lane_n, {**buffers, mode: [rows] if mode == "packed" else rows}

            return go

        run = run_as(unbatched_mode)
        if vmapped_mode != unbatched_mode:
            run = _unbatched_or_vmapped(run, lambda _: run_as(vmapped_mode))
        floats, arrays, lane_n, buffers = run(floats, consts, arrays, other_consts, cond_consts, buffers)
        return (floats, arrays), (lane_n, buffers, consts, other_consts)

    def pull_back(treedef, pullback_leaves, taken, f_bar, k_bar):
        step_f_bar, step_k_bar = jax.tree_util.tree_unflatten(treedef, pullback_leaves)(f_bar)
        return taken_only(taken, step_f_bar, step_k_bar, f_bar, k_bar)

    def taken_only(taken, step_f_bar, step_k_bar, f_bar, k_bar):
        f_bar = [_lane_select(taken, new, old) for new, old in zip(step_f_bar, f_bar)]
        k_bar = jax.tree_util.tree_map(lambda k, s: _lane_select(taken, k + s, k), k_bar, step_k_bar)
        return f_bar, k_bar

    def sweep(lane_n, consts, floats_bar, pull):
        """From the last iteration any lane took down to the first, ``pull(row, taken, f_bar,
        k_bar)``: the cotangents after that iteration's pullback."""

        def loop_body(c):
            row, f_bar, k_bar = c
            return (row - 1, *pull(row, row < lane_n, f_bar, k_bar))  # rows past a lane's last are not its

        k_bar = jax.tree_util.tree_map(jnp.zeros_like, consts)
        last = eqxi.unvmap_max(lane_n) - 1
        _, floats_bar, k_bar = lax.while_loop(lambda c: c[0] >= 0, loop_body, (last, list(floats_bar), k_bar))
        return floats_bar, k_bar

    def general_bwd(lane_n, buffers, consts, floats_bar):
        (treedef,) = pullback_def
        return sweep(lane_n, consts, floats_bar, lambda row, taken, f_bar, k_bar: pull_back(
            treedef, unpack([b[row] for b in buffers]), taken, f_bar, k_bar))

    def inputs_bwd(lane_n, rows, consts, floats_bar, other_consts):
        """``general_bwd`` for a forward that stored each iteration's inputs: the iteration is
        linearised again from them (one more evaluation of the body per iteration, no
        replay from earlier ones)."""
        zeros = {i: jnp.zeros(m.shape, m.dtype) for i, m in enumerate(moving0) if i not in live}

        def pull(row, taken, f_bar, k_bar):
            leaves = iter(in_unpack([b[row] for b in rows]))
            f = [zeros[i] if i in zeros else next(leaves) for i in range(len(moving0))]
            a = list(leaves)
            _, pullback = jax.vjp(lambda f, k: step(f, k, a, other_consts)[0], f, consts)
            return taken_only(taken, *pullback(f_bar), f_bar, k_bar)

        return sweep(lane_n, consts, floats_bar, pull)

    def packed_bwd(lane_n, row_bytes, consts, floats_bar):
        """``general_bwd`` for a forward that ran as ``_packed_loop``: the cotangents carried as
        bytes, the pullback a branch of its own that reads the row's pieces."""
        (treedef,) = pullback_def
        floats_bar = list(floats_bar)
        k_leaves, k_def = jax.tree_util.tree_flatten(jax.tree_util.tree_map(jnp.zeros_like, consts))
        bars, nf = _Bytes([*map(_spec, floats_bar), *map(_spec, k_leaves)]), len(floats_bar)

        def loop_body(c):
            row, words = c
            pieces = [lax.dynamic_slice(row_bytes, (row, jnp.int32(start)), (1, n))[0]
                      for start, n in residual_bytes.spans]

            def one(operand):
                pieces, words = operand
                leaves = bars.unpack(words)
                f_bar, k_bar = pull_back(treedef, residual_bytes.from_pieces(pieces), row < lane_n, leaves[:nf],
                                         jax.tree_util.tree_unflatten(k_def, leaves[nf:]))
                return bars.pack([*f_bar, *jax.tree_util.tree_leaves(k_bar)])

            return row - 1, _on_its_own(one, (pieces, words), row >= 0, words[0] >= 0)

        last = eqxi.unvmap_max(lane_n) - 1
        _, words = lax.while_loop(lambda c: c[0] >= 0, loop_body, (last, bars.pack([*floats_bar, *k_leaves])))
        leaves = bars.unpack(words)
        return leaves[:nf], jax.tree_util.tree_unflatten(k_def, leaves[nf:])

    def run_bwd(residuals, cotangents):
        lane_n, buffers, consts, other_consts = residuals

        def bwd_as(mode):
            def go(lane_n, buffers, consts, f_bar, other_consts):
                if mode == "packed":
                    return packed_bwd(lane_n, buffers[mode][0], consts, f_bar)
                if mode == "inputs":
                    return inputs_bwd(lane_n, buffers[mode], consts, f_bar, other_consts)
                return general_bwd(lane_n, buffers[mode], consts, f_bar)

            return go

        bwd = bwd_as(unbatched_mode)
        if vmapped_mode != unbatched_mode:
            # The rows are batched exactly when the forward ran vmapped (its outputs are all
            # batched then); unbatched (jax.vmap over the cotangents only, as in jax.jacrev)
            # they are the unbatched forward's.
            bwd = _unbatched_or_vmapped(bwd, lambda in_batched: bwd_as(
                vmapped_mode if any(jax.tree_util.tree_leaves(in_batched[1])) else unbatched_mode))
        return (*bwd(lane_n, buffers, consts, cotangents[0], other_consts), None, None, None)

    run.defvjp(run_fwd, run_bwd)

    # JAX refuses forward mode (jax.jvp, jax.jacfwd) of a custom_vjp only after diffrax's jit
    # has traced this call, outside any code of ours, and its error points at the next line:
    moving, arrays = run(moving0, float_consts, arrays0, other_consts, cond_closed.consts)  # AllSaveAdjoint is reverse-mode only: for forward mode use diffrax.ForwardMode()  # noqa: E501
    return _merge(all_floats(moving, float_consts), arrays, meta)


def _write_only(step, moving, consts, arrays, other_consts) -> set:
    """Indices of the carried floats whose values only ever flow into their own next value: no
    other output of the loop body and no part of the body's pullback reads them (diffrax's
    buffers of saved times and values, written row by row). Found as the largest set closed
    under that rule, from the liveness of one body's jaxpr. (The loop's decisions may read
    them: the re-run that zeroes them takes its decisions from the stored iteration count.)"""

    def probe(moving, consts, arrays, other_consts, cotangent):
        out, pullback, out_arrays = jax.vjp(lambda f, k: step(f, k, arrays, other_consts), moving, consts,
                                            has_aux=True)
        return out, (out_arrays, pullback(cotangent))

    cotangent = [jnp.zeros(jnp.shape(x), jnp.result_type(x)) for x in moving]
    closed = jax.make_jaxpr(probe)(moving, consts, arrays, other_consts, cotangent)
    jaxpr = closed.jaxpr
    n = len(moving)
    body_out, rest = jaxpr.outvars[:n], jaxpr.outvars[n:]
    candidates = set(range(n))
    while True:
        needed = rest + [v for i, v in enumerate(body_out) if i not in candidates]
        live = _liveness.live_inputs(jaxpr, needed)
        read = {i for i in candidates if jaxpr.invars[i] in live}
        if not read:
            return candidates
        candidates -= read


def _unrollable(solver, terms) -> bool:
    """Whether ``solver`` is a plain explicit Runge-Kutta method whose step ``_UnrolledERK``
    reproduces: one explicit Butcher tableau and diffrax's own ``step``."""
    return (
        isinstance(solver, AbstractERK)
        and not isinstance(solver, AbstractWrappedSolver)
        and isinstance(solver.tableau, ButcherTableau)
        and not solver.tableau.implicit
        and type(solver).step is AbstractRungeKutta.step
        and isinstance(terms, diffrax.AbstractTerm)
    )


def _dot(weights, ks):
    """sum_j weights[j] * ks[j] over the stages with a nonzero weight (ks: one pytree per stage)."""
    terms = [(w, k) for w, k in zip(weights, ks) if w != 0]
    if not terms:
        return jax.tree_util.tree_map(jnp.zeros_like, ks[0])

    def leaf(*k):
        dtype = k[0].dtype
        total = jnp.asarray(terms[0][0], dtype) * k[0]
        for (w, _), x in zip(terms[1:], k[1:]):
            total = total + jnp.asarray(w, dtype) * x
        return total

    return jax.tree_util.tree_map(leaf, *[k for _, k in terms])


class _UnrolledERK(diffrax.AbstractAdaptiveSolver, AbstractWrappedSolver):
    """The step of an explicit diffrax Runge-Kutta solver with its stages written out one
    after another, in place of diffrax's loop over stages.

    Same arithmetic as ``AbstractRungeKutta.step`` for an explicit tableau (FSAL reuse of the
    last stage, ``vf_prod`` for non-FSAL methods, stage times with c = 1 landing on t1 exactly,
    y1 from the last stage when the method is SSAL), so results agree with diffrax's to
    rounding. Why: diffrax runs the stages as a bounded loop of conditionals, a dozen small
    kernels per stage that dominate the time of a cheap vector field, forward and again in
    the transposed backward pass. Written out, each stage is a few fused array operations,
    and each step's linearisation is one straight-line function to store.
    """

    solver: AbstractERK

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):
        return self.solver.interpolation_cls

    @property
    def term_compatible_contr_kwargs(self):
        return self.solver.term_compatible_contr_kwargs

    def order(self, terms):
        return self.solver.order(terms)

    def strong_order(self, terms):
        return self.solver.strong_order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def init(self, terms, t0, t1, y0, args):
        return self.solver.init(terms, t0, t1, y0, args)

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        tableau = self.solver.tableau
        _, fsal = self.solver._common(terms, t0, t1, y0, args)
        control = terms.contr(t0, t1)
        dt = t1 - t0
        t_dtype = jnp.result_type(t0, t1)
        c = (tableau.c1, *tableau.c)

        def stage_time(ci):
            return t1 if ci == 1 else t0 + jnp.asarray(ci, t_dtype) * dt

        def stage(ti, yi):
            # FSAL methods evaluate the field and contract it with the control (the last
            # stage's f is the next step's first); the others ask the term for the product.
            if fsal:
                fi = terms.vf(ti, yi, args)
                return fi, terms.prod(fi, control)
            return None, terms.vf_prod(ti, yi, args, control)

        if fsal:
            first_step, f_last = solver_state
            # The stored field value is stale on the first step and after a jump; the
            # decision is per batch, as in diffrax, so the branch stays a branch under vmap.
            fresh = eqxi.unvmap_any(first_step | made_jump)
            f0 = lax.cond(fresh, lambda: terms.vf(stage_time(c[0]), y0, args), lambda: f_last)
            ks = [terms.prod(f0, control)]
        else:
            _, k0 = stage(stage_time(c[0]), y0)
            ks = [k0]
        for ci, a_i in zip(tableau.c, tableau.a_lower):  # a tableau has at least two stages
            yi = jax.tree_util.tree_map(jnp.add, y0, _dot(a_i, ks))
            f_last, ki = stage(stage_time(ci), yi)
            ks.append(ki)
        # Solution and error weights against the stacked stages, as diffrax forms them (the
        # dense output needs the stack anyway).
        k = jax.tree_util.tree_map(lambda *k: jnp.stack(k), *ks)
        leaves = jax.tree_util.tree_leaves(y0)
        dtype = jnp.result_type(*leaves) if leaves else jnp.asarray(0.0).dtype
        if tableau.ssal:
            y1 = yi
        else:
            y1 = jax.tree_util.tree_map(jnp.add, y0, vector_tree_dot(jnp.asarray(tableau.b_sol, dtype), k))
        y_error = vector_tree_dot(jnp.asarray(tableau.b_error, dtype), k)
        dense_info = dict(y0=y0, y1=y1, k=k)
        new_state = (jnp.array(False), f_last) if fsal else None
        return y1, y_error, dense_info, new_state, diffrax.RESULTS.successful


class AllSaveAdjoint(diffrax.AbstractAdjoint):
    """Backpropagate through ``diffrax.diffeqsolve`` by storing every step's internals once.

    The forward pass keeps, for each step taken, the residuals of that step's linearisation
    (or, see ``store``, its inputs); the backward pass is one reverse sweep over the steps
    actually taken (not over ``max_steps``) that applies them. With residuals no step, stage
    or controller decision is recomputed: the backward pass evaluates the vector field zero
    times. Memory: ``bytes_per_step(...)`` per step, times ``max_steps`` (times the batch
    under ``jax.vmap``: ``bytes_per_step(..., vmapped=True)``), allocated up front. On a CPU
    the rows are not initialised, so rows past the last step cost address space but no time;
    elsewhere they are filled before the loop: there set ``max_steps`` near the steps taken.
    Explicit Runge-Kutta solvers with one Butcher tableau step through ``_UnrolledERK``: the
    same step with its stages written out, much cheaper to run and to linearise than
    diffrax's loop over stages.

    ``store``: what each step keeps for the backward pass.
    - ``"residuals"``: its linearisation's residuals, as above (zero field evaluations in
      the backward pass).
    - ``"inputs"``: its inputs (state, FSAL derivative, step size and controller scalars; not
      the buffers of saved values, which a step only writes); the backward pass linearises each
      step again from them: once more the step's field evaluations, never a step re-run from
      an earlier one (``RecursiveCheckpointAdjoint`` re-runs from checkpoints, through
      diffrax's stage loop). Far fewer bytes for a state-dependent field: 391 against 4,452
      per step for a 20-component Van der Pol ring with Dopri5.
    - ``"auto"`` (default): inputs under ``jax.vmap`` on a CPU when they are fewer bytes than
      the residuals, residuals otherwise (the rows of both are then allocated, on a CPU
      uninitialised, and one set is written). On a CPU every lane's rows are written to
      memory fresh from the operating system on each call, and there the bytes cost more than
      the recomputation (README "For diffrax users"); a single solve keeps the residuals. Not
      yet measured on a GPU, so there it keeps the residuals.

    Works with explicit solvers (Tsit5, Dopri5, Dopri8, Heun, Euler, ...), ConstantStepSize or
    PIDController, SaveAt(t0/t1/ts/steps), pytree states and args. Reverse mode only: for
    jax.jvp or jax.jacfwd use ``diffrax.ForwardMode()``.
    """

    store: str = eqx.field(default="auto", static=True)
    recorder: object = eqx.field(default=None, static=True)

    def __check_init__(self):
        if self.store not in ("auto", "residuals", "inputs"):
            raise ValueError(f"AllSaveAdjoint(store=...) takes 'auto', 'residuals' or 'inputs', got {self.store!r}")

    def loop(self, *, solver, max_steps, terms, throw, passed_solver_state, passed_controller_state,
             event, **kwargs):
        del throw, passed_solver_state, passed_controller_state
        if isinstance(solver, diffrax.AbstractImplicitSolver):
            raise ValueError(
                f"AllSaveAdjoint supports explicit solvers only, got {type(solver).__name__}; use "
                "diffrax.RecursiveCheckpointAdjoint() for implicit solvers"
            )
        if is_sde(terms):
            raise ValueError("AllSaveAdjoint does not support SDEs; use diffrax.RecursiveCheckpointAdjoint()")
        if event is not None:
            raise ValueError("AllSaveAdjoint does not support events; use diffrax.RecursiveCheckpointAdjoint()")
        if max_steps is None:
            raise ValueError("AllSaveAdjoint allocates max_steps rows of residuals: pass max_steps=...")
        if _unrollable(solver, terms):
            solver = _UnrolledERK(solver)
        elif isinstance(solver, AbstractRungeKutta) and solver.scan_kind is None:
            # The stage loop must be reverse-differentiable without checkpointing (which would
            # recompute stages): diffrax's "bounded" scan stores its residuals.
            solver = eqx.tree_at(lambda s: s.scan_kind, solver, "bounded", is_leaf=lambda x: x is None)
        return self._loop(
            solver=solver,
            max_steps=max_steps,
            terms=terms,
            event=event,
            # The loop that saves at ``ts`` inside each step is an all-save loop too: as a
            # "bounded" loop (diffrax's DirectAdjoint) it ran and linearised len(ts) guarded
            # iterations every step, 90% of the time of a small solve saving 11 times.
            inner_while_loop=ft.partial(_all_save_loop, store_inputs=True),
            outer_while_loop=ft.partial(_all_save_loop, recorder=self.recorder, store=self.store),
            **kwargs,
        )

    @staticmethod
    def bytes_per_step(terms, solver, t0, t1, dt0, y0, args=None, *, store="auto", vmapped=False,
                       **diffeqsolve_kwargs) -> int:
        """Bytes ``AllSaveAdjoint(store=store)`` stores per step for this problem (no work is
        done: the solve is only traced): of one solve, or with ``vmapped=True`` of each lane
        under ``jax.vmap`` (y0 and args then of one lane). Multiply by max_steps (and the
        lanes) for the memory it allocates."""
        recorder = _Recorder()
        jax.eval_shape(
            lambda y0, args: diffrax.diffeqsolve(terms, solver, t0, t1, dt0, y0, args,
                                                 adjoint=AllSaveAdjoint(store=store, recorder=recorder),
                                                 **diffeqsolve_kwargs),
            y0, args,
        )
        return recorder.bytes_per_step_vmapped if vmapped else recorder.bytes_per_step


def _all_save_loop(cond_fun, body_fun, init_val, *, max_steps, buffers=None, recorder=None, store_inputs=False,
                   store="auto", **_):
    del buffers  # the saved outputs are carried as ordinary arrays
    return all_save_while_loop(cond_fun, body_fun, init_val, max_steps=max_steps, recorder=recorder,
                               store_inputs=store_inputs, store=store)
