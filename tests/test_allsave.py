"""AllSaveAdjoint: diffrax gradients equal RecursiveCheckpointAdjoint's, with no recomputation.

Vector-field evaluations counted with a host callback (B = 1 solve of a 2-vector), measured on
this project's CPU machine, 20 fixed Tsit5 steps (forward / jit(grad)):

    AllSaveAdjoint                 121 / 121   the backward pass evaluates the field zero times
    DirectAdjoint                  121 / 242
    RecursiveCheckpointAdjoint()   121 / 424
"""

import traceback

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedrk
from fusedrk import _allsave, _uninitialised
from bench.allsave import van_der_pol_ring as _ring  # the benchmark's ring, here of 5 oscillators (10 components)
from conftest import CountedField, assert_tree_close


def field(t, y, args):
    return {"a": -args["k"] * y["a"] + jnp.sin(t) * y["b"], "b": -y["a"] * args["c"]}


def _y0_args():
    return {"a": jnp.array([1.0, 2.0]), "b": jnp.array([0.5, -0.5])}, {"k": jnp.asarray(0.7), "c": jnp.asarray(1.3)}


def _grads(solver, controller, saveat, adjoint, max_steps=256):
    def loss(y0, args, scale):
        y0 = jax.tree_util.tree_map(lambda x: x * scale, y0)
        sol = diffrax.diffeqsolve(diffrax.ODETerm(field), solver, 0.0, 2.0, 0.05, y0, args, saveat=saveat,
                                  stepsize_controller=controller, adjoint=adjoint, max_steps=max_steps)
        leaves = jax.tree_util.tree_leaves(sol.ys)
        return sum(jnp.sum(jnp.where(jnp.isfinite(x), jnp.sin(x), 0.0)) for x in leaves)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda scale=1.0: grad(*_y0_args(), jnp.asarray(scale))


def _rounding_spread(grad):
    """How far a gradient moves when y0 moves by a few ulps: its own rounding noise.

    Adaptive steps feed the error estimate, a sum that cancels to far below |y|, into the
    step-size controller; the gradient through that path carries rounding noise the size of
    eps * |stages| / |error|. For Dopri8 at rtol = 1e-8 the error sits near rounding level and
    diffrax's own DirectAdjoint gradient moves by 2e-9 relative when y0 moves by 2e-16 (by
    3e-7 with SaveAt(steps=True), where every step time enters the loss).
    """
    reference = grad()
    spread = 0.0
    for scale in (1 + 2**-52, 1 + 2**-50, 1 - 2**-51):
        for a, b in zip(jax.tree_util.tree_leaves(grad(scale)), jax.tree_util.tree_leaves(reference)):
            spread = max(spread, float(jnp.max(jnp.abs(a - b) / jnp.abs(b))))
    return spread


_SOLVERS = {
    "tsit5-fixed": (diffrax.Tsit5(), diffrax.ConstantStepSize()),
    "tsit5-pid": (diffrax.Tsit5(), diffrax.PIDController(rtol=1e-7, atol=1e-9)),
    "dopri5-pid": (diffrax.Dopri5(), diffrax.PIDController(rtol=1e-6, atol=1e-8)),
    "dopri8-pid": (diffrax.Dopri8(), diffrax.PIDController(rtol=1e-8, atol=1e-10)),
    "heun-fixed": (diffrax.Heun(), diffrax.ConstantStepSize()),
    "euler-fixed": (diffrax.Euler(), diffrax.ConstantStepSize()),
}
# Every save mode for Tsit5 (the save modes differ in the loop, not in the solver); the other
# solvers with save times only, which exercise their dense output too.
_MATRIX = [(name, saveat) for name in _SOLVERS for saveat in
           (("t1", "ts", "steps") if name.startswith("tsit5") else ("ts",))]


@pytest.mark.parametrize("name, saveat", _MATRIX, ids=[f"{n}-{s}" for n, s in _MATRIX])
def test_gradients_equal_direct_and_recursive_checkpoint(x64, name, saveat):
    solver, controller = _SOLVERS[name]
    saveat = {"t1": diffrax.SaveAt(t1=True), "ts": diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, 5)),
              "steps": diffrax.SaveAt(steps=True)}[saveat]
    ours = _grads(solver, controller, saveat, fusedrk.AllSaveAdjoint())()
    # DirectAdjoint differentiates the same program without recomputation: equal to rounding,
    # which with adaptive steps is the oracle's own noise under ulp changes of y0 (measured
    # in the run; at most 1e-14 here except for Dopri8, see _rounding_spread).
    direct = _grads(solver, controller, saveat, diffrax.DirectAdjoint())
    noise = 0.0 if isinstance(controller, diffrax.ConstantStepSize) else _rounding_spread(direct)
    assert_tree_close(ours, direct(), rtol=max(1e-12, 10 * noise))
    # RecursiveCheckpointAdjoint replays each step in its backward pass. With fixed steps the
    # replay retraces the forward and all three adjoints agree. With the PID controller its
    # gradients differ from DirectAdjoint's (measured: 4e-10 to 3e-8 relative; 0.28 absolute
    # for Dopri8 with SaveAt(steps=True)), so there DirectAdjoint is the oracle.
    if isinstance(controller, diffrax.ConstantStepSize):
        rca = _grads(solver, controller, saveat, diffrax.RecursiveCheckpointAdjoint())()
        assert_tree_close(ours, rca, rtol=1e-12)


@pytest.mark.parametrize("controller", [diffrax.ConstantStepSize(), diffrax.PIDController(rtol=1e-6, atol=1e-8)])
def test_backward_evaluates_the_field_zero_times(x64, controller):
    counted = CountedField()

    def count(adjoint, grad):
        def loss(y0, k):
            return jnp.sum(diffrax.diffeqsolve(diffrax.ODETerm(counted), diffrax.Tsit5(), 0.0, 2.0, 0.1, y0, k,
                                               stepsize_controller=controller, adjoint=adjoint, max_steps=64).ys)

        fn = jax.jit(jax.grad(loss, argnums=(0, 1)) if grad else loss)
        return counted.count(fn, jnp.ones(2), jnp.asarray(0.5))

    forward = count(fusedrk.AllSaveAdjoint(), grad=False)
    assert forward > 20
    assert count(fusedrk.AllSaveAdjoint(), grad=True) == forward
    assert count(diffrax.DirectAdjoint(), grad=True) == 2 * forward
    assert count(diffrax.RecursiveCheckpointAdjoint(), grad=True) > 2 * forward


def test_bytes_per_step_and_memory_limit():
    y0 = jnp.ones(1000)
    per_step = fusedrk.AllSaveAdjoint.bytes_per_step(diffrax.ODETerm(lambda t, y, a: jnp.sin(y)),
                                                     diffrax.Tsit5(), 0.0, 1.0, 0.1, y0)
    # A state-dependent Jacobian needs each of the six new stages of a 1000-float state (the
    # seventh is the FSAL reuse); measured 13 copies of the state, allow up to 30.
    assert 6 * 4000 <= per_step <= 30 * 4000

    def loss(y0):
        return jnp.sum(diffrax.diffeqsolve(diffrax.ODETerm(lambda t, y, a: -y), diffrax.Tsit5(), 0.0, 1.0, 0.1, y0,
                                           adjoint=fusedrk.AllSaveAdjoint(), max_steps=10**9).ys)

    with pytest.raises(MemoryError, match="bytes per step"):
        jax.jit(jax.grad(loss)).lower(y0)


def test_saving_at_more_times_stores_no_more_per_step():
    # The loop that saves at ts inside each step keeps only its inputs and re-runs in the
    # backward pass: its len(ts) rows are not part of every step's residuals (before: ~170
    # bytes per save time per step for a 2-vector). What grows is the ts array itself, kept
    # as an input (8 bytes per save time).
    def per_step(num_ts):
        return fusedrk.AllSaveAdjoint.bytes_per_step(
            diffrax.ODETerm(field), diffrax.Dopri5(), 0.0, 2.0, 0.05, *_y0_args(),
            stepsize_controller=diffrax.PIDController(rtol=1e-7, atol=1e-9),
            saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, num_ts)), max_steps=64)

    assert per_step(101) - per_step(11) <= 90 * 8


def test_a_loop_buffer_that_is_read_is_kept():
    # store_inputs=True and store="inputs" leave write-only carried floats out of what they
    # store and run the body on zeros in their place; a buffer the body reads back must be kept. Here the body
    # reads row i - 1 of the buffer it writes, and the gradient is checked against the
    # unrolled computation.
    from fusedrk._allsave import all_save_while_loop

    def run(x, store_inputs, store):
        def body(c):
            i, acc, buf, log = c
            new = buf.at[i].set(jnp.sin(x * i + buf[jnp.maximum(i - 1, 0)]))
            return i + 1, acc + new[i] ** 2, new, log.at[i].set(acc)

        init = (jnp.int32(0), jnp.asarray(0.0), jnp.full(6, 0.3), jnp.zeros(6))
        _, acc, buf, log = all_save_while_loop(lambda c: c[0] < 5, body, init, max_steps=6,
                                               store_inputs=store_inputs, store=store)
        return acc + jnp.sum(buf) + 0.5 * jnp.sum(log)

    def unrolled(x):
        acc, buf, log = 0.0, [0.3] * 6, [0.0] * 6
        for i in range(5):
            buf[i] = jnp.sin(x * i + buf[max(i - 1, 0)])
            log[i] = acc
            acc = acc + buf[i] ** 2
        return acc + sum(buf) + 0.5 * sum(log)

    x = jnp.asarray(0.7)
    expected = jax.grad(unrolled)(x)
    # The outer loop storing residuals or each iteration's inputs (store="inputs" keeps buf, which
    # the body reads, and drops log), and the re-running loop of store_inputs=True.
    for store_inputs, store in ((False, "residuals"), (False, "inputs"), (True, "auto")):
        grad = jax.jit(jax.grad(lambda x: run(x, store_inputs, store)))(x)
        np.testing.assert_allclose(grad, expected, rtol=1e-6)


def _write_only_found(monkeypatch, body, init):
    """What ``_allsave._write_only`` finds for the loop ``while c[0] < 5: c = body(c)`` (the
    outermost loop's answer when loops nest: it is asked last)."""
    found = []
    real = _allsave._write_only
    monkeypatch.setattr(_allsave, "_write_only", lambda *a: found.append(real(*a)) or found[-1])
    _allsave.all_save_while_loop(lambda c: c[0] < 5, body, init, max_steps=6, store_inputs=True)
    return found[-1]


def test_write_only_finds_the_saved_buffers(monkeypatch):
    # log is only ever written and acc only feeds its own next value (a running sum: its
    # pullback passes the cotangent through without reading it), so neither value is needed to
    # re-run the loop for its linearisation; buf is read back by the body.
    def body(c):
        i, acc, buf, log = c
        new = buf.at[i].set(jnp.sin(i + buf[jnp.maximum(i - 1, 0)]))
        return i + 1, acc + new[i], new, log.at[i].set(2.0 * i)

    init = (jnp.int32(0), jnp.asarray(0.0), jnp.zeros(6), jnp.zeros(6))
    assert _write_only_found(monkeypatch, body, init) == {0, 2}  # moving floats in order: acc, buf, log


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(solver=diffrax.Kvaerno5(), stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-5)),
         "explicit solvers only.*RecursiveCheckpointAdjoint"),
        (dict(event=diffrax.Event(lambda t, y, args, **kw: y[0] - 0.5)), "events.*RecursiveCheckpointAdjoint"),
        (dict(max_steps=None), "max_steps"),
    ],
)
def test_unsupported_combinations(kwargs, match):
    kw = dict(solver=diffrax.Tsit5(), max_steps=64)
    kw.update(kwargs)
    solver = kw.pop("solver")
    with pytest.raises(ValueError, match=match):
        diffrax.diffeqsolve(diffrax.ODETerm(lambda t, y, a: -y), solver, 0.0, 1.0, 0.1, jnp.ones(2),
                            adjoint=fusedrk.AllSaveAdjoint(), **kw)


def test_sde_terms_are_refused():
    bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=1e-3, shape=(2,), key=jax.random.PRNGKey(0))
    terms = diffrax.MultiTerm(diffrax.ODETerm(lambda t, y, a: -y), diffrax.ControlTerm(lambda t, y, a: jnp.eye(2), bm))
    with pytest.raises(ValueError, match="SDE"):
        diffrax.diffeqsolve(terms, diffrax.Euler(), 0.0, 1.0, 0.1, jnp.ones(2), adjoint=fusedrk.AllSaveAdjoint(),
                            max_steps=64)


def test_forward_mode_is_refused_naming_forward_mode():
    def solve(y0):
        return diffrax.diffeqsolve(diffrax.ODETerm(lambda t, y, a: -y), diffrax.Tsit5(), 0.0, 1.0, 0.1, y0,
                                   adjoint=fusedrk.AllSaveAdjoint(), max_steps=64).ys

    # JAX raises this after diffrax's jit has traced the solve, outside fusedrk's code; the
    # traceback it prints ends at the source line of the loop, which names the way out.
    with pytest.raises(TypeError, match="forward-mode autodiff") as info:
        jax.jvp(solve, (jnp.ones(2),), (jnp.ones(2),))
    assert "reverse-mode only: for forward mode use diffrax.ForwardMode()" in "".join(
        traceback.format_exception(info.value))


@pytest.mark.parametrize("save", ["t1", "ts"])
@pytest.mark.parametrize("order", ["vmap(grad)", "grad(vmap)"])
def test_works_under_vmap(x64, save, order):
    # Lanes take different numbers of steps (k spans 0.5 to 9). grad(vmap) with SaveAt(t1) once
    # failed to trace ("start_indices ... must be scalars") when the primal loop and the
    # recording loop batched their carries differently.
    # The save times are made here, under x64: made at import they were float32, diffrax then
    # runs the whole time axis in float32, and any two valid orders of those float32 operations
    # differ by ~1e-9 relative (AllSave's and DirectAdjoint's gradients do, by 1.7e-9).
    saveat = diffrax.SaveAt(t1=True) if save == "t1" else diffrax.SaveAt(ts=jnp.linspace(0.0, 1.0, 5))
    def loss(y0, k, adjoint):
        sol = diffrax.diffeqsolve(diffrax.ODETerm(lambda t, y, a: -a * y), diffrax.Tsit5(), 0.0, 1.0, 0.1, y0, k,
                                  stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
                                  saveat=saveat, adjoint=adjoint, max_steps=64)
        return jnp.sum(sol.ys), sol.stats["num_steps"]

    def grads(adjoint):
        one = jax.grad(loss, argnums=1, has_aux=True)
        if order == "vmap(grad)":
            return jax.jit(jax.vmap(lambda k: one(jnp.ones(2), k, adjoint)))(k)
        total = jax.grad(lambda k: jnp.sum(jax.vmap(lambda k: loss(jnp.ones(2), k, adjoint)[0])(k)))
        steps = jax.vmap(lambda k: loss(jnp.ones(2), k, adjoint)[1])(k)
        return jax.jit(total)(k), steps

    k = jnp.asarray([0.5, 3.0, 9.0])
    ours, steps = grads(fusedrk.AllSaveAdjoint())
    # DirectAdjoint, not RecursiveCheckpointAdjoint: with the PID controller the latter departs
    # from both by ~1e-9 when saving at ts (see test_gradients_equal_direct_and_recursive_checkpoint).
    ref, ref_steps = grads(diffrax.DirectAdjoint())
    assert len(set(np.asarray(steps).tolist())) > 1  # the lanes do stop at different steps
    np.testing.assert_array_equal(steps, ref_steps)
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


@pytest.mark.parametrize("order", ["plain", "vmap(grad)"])
def test_rows_past_the_last_step_are_never_read(x64, monkeypatch, order):
    # The residual rows are not initialised on CPU (fusedrk/_uninitialised.py): filled with
    # NaN instead, the gradient must not change (max_steps = 256 rows, ~30 steps written).
    monkeypatch.setattr(_uninitialised, "MIN_BYTES", 0)  # the custom call for every buffer

    def grads():
        g = _grads(diffrax.Tsit5(), diffrax.PIDController(rtol=1e-7, atol=1e-9),
                   diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, 5)), fusedrk.AllSaveAdjoint())
        if order == "plain":
            return g()
        return jax.vmap(g)(jnp.asarray([0.5, 1.0, 3.0]))

    expected = grads()
    monkeypatch.setattr(_uninitialised, "FILL_FOR_TESTS", True)
    filled = grads()
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(filled))
    assert_tree_close(filled, expected, rtol=1e-12)


@pytest.mark.parametrize(
    "solver, controller",
    [
        (diffrax.Tsit5(), diffrax.PIDController(rtol=1e-7, atol=1e-9)),
        # Not rtol=1e-8: there Dopri8's error estimate is at rounding level, so the step sizes,
        # and the values to ~1e-8, follow the last bits of the stage sums (see _rounding_spread).
        (diffrax.Dopri8(), diffrax.PIDController(rtol=1e-6, atol=1e-8)),
        (diffrax.Bosh3(), diffrax.PIDController(rtol=1e-5, atol=1e-7)),
        (diffrax.Ralston(), diffrax.ConstantStepSize()),
        (diffrax.Midpoint(), diffrax.ConstantStepSize()),
    ],
    ids=["tsit5", "dopri8", "bosh3", "ralston", "midpoint"],
)
def test_unrolled_stages_step_like_diffrax(x64, solver, controller):
    # AllSaveAdjoint writes an explicit tableau's stages out one by one instead of running
    # diffrax's loop over stages; the forward solve must take the same steps to the same values.
    from fusedrk._allsave import _unrollable

    assert _unrollable(solver, diffrax.ODETerm(field))

    def solve(adjoint):
        return diffrax.diffeqsolve(diffrax.ODETerm(field), solver, 0.0, 2.0, 0.05, *_y0_args(),
                                   saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, 7), dense=True),
                                   stepsize_controller=controller, adjoint=adjoint, max_steps=256)

    ours, theirs = solve(fusedrk.AllSaveAdjoint()), solve(diffrax.DirectAdjoint())
    assert_tree_close(ours.ys, theirs.ys, rtol=1e-13)
    assert_tree_close(ours.evaluate(1.234), theirs.evaluate(1.234), rtol=1e-13)
    for stat in ("num_steps", "num_accepted_steps", "num_rejected_steps"):
        assert int(ours.stats[stat]) == int(theirs.stats[stat]), stat


def test_unrolled_stages_with_a_multi_term_and_its_gradient(x64):
    # A MultiTerm of ODE terms under one tableau: the terms' vf/prod carry the sum, as in diffrax.
    def half(t, y, args):
        return jax.tree_util.tree_map(lambda v: 0.5 * v, field(t, y, args))

    terms = diffrax.MultiTerm(diffrax.ODETerm(half), diffrax.ODETerm(half))
    controller = diffrax.PIDController(rtol=1e-6, atol=1e-8)

    def loss(y0, args, adjoint):
        sol = diffrax.diffeqsolve(terms, diffrax.Tsit5(), 0.0, 2.0, 0.05, y0, args, stepsize_controller=controller,
                                  adjoint=adjoint, max_steps=256)
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree_util.tree_leaves(sol.ys)), sol.stats["num_steps"]

    ours, ours_steps = loss(*_y0_args(), fusedrk.AllSaveAdjoint())
    theirs, theirs_steps = loss(*_y0_args(), diffrax.DirectAdjoint())
    assert int(ours_steps) == int(theirs_steps)
    np.testing.assert_allclose(ours, theirs, rtol=1e-13)
    grad = jax.grad(lambda *a: loss(*a, fusedrk.AllSaveAdjoint())[0], argnums=(0, 1))(*_y0_args())
    expected = jax.grad(lambda *a: loss(*a, diffrax.DirectAdjoint())[0], argnums=(0, 1))(*_y0_args())
    assert_tree_close(grad, expected, rtol=1e-12)


def _packed(y0, args, solver=diffrax.Dopri5(), **kwargs):
    recorder = _allsave._Recorder()
    jax.eval_shape(lambda y0, args: diffrax.diffeqsolve(
        diffrax.ODETerm(field), solver, 0.0, 2.0, 0.05, y0, args, adjoint=fusedrk.AllSaveAdjoint(recorder=recorder),
        max_steps=64, **kwargs), y0, args)
    return recorder.packed


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the packed loop is for XLA:CPU")
def test_a_small_step_runs_packed_and_a_large_one_does_not(x64):
    # Packed (_allsave._packed_loop): every value of one step within 512 bytes, where XLA:CPU
    # runs operations one after another, and so the carry. The 4-component state of `field`
    # is, saved at t1 or at 5 times; 100 components are not (a stage is 800 bytes), nor is the
    # carry once it holds the values saved at 11 times (2 x 176 bytes of them).
    pid = diffrax.PIDController(rtol=1e-7, atol=1e-9)
    y0, args = _y0_args()
    assert _packed(y0, args, stepsize_controller=pid)
    assert _packed(y0, args, stepsize_controller=pid, saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, 5)))
    big = jax.tree_util.tree_map(lambda x: jnp.ones(50), y0)
    assert not _packed(big, args, stepsize_controller=pid)
    assert not _packed(y0, args, stepsize_controller=pid, saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, 11)))


def test_jacrev_of_a_packed_solve(x64):
    # jax.jacrev vmaps the backward pass over cotangents while the forward ran unvmapped
    # (packed on CPU): the vmapped backward must read the packed rows.
    def solve(y0, args, adjoint):
        sol = diffrax.diffeqsolve(diffrax.ODETerm(field), diffrax.Dopri5(), 0.0, 2.0, 0.05, y0, args,
                                  stepsize_controller=diffrax.PIDController(rtol=1e-7, atol=1e-9),
                                  saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, 3)), adjoint=adjoint, max_steps=64)
        return sol.ys

    y0, args = _y0_args()
    ours = jax.jit(jax.jacrev(solve, argnums=(0, 1)), static_argnums=2)(y0, args, fusedrk.AllSaveAdjoint())
    ref = jax.jit(jax.jacrev(solve, argnums=(0, 1)), static_argnums=2)(y0, args, diffrax.DirectAdjoint())
    assert_tree_close(ours, ref, rtol=1e-12)


def test_bytes_round_trip_bit_for_bit(x64):
    leaves = [jnp.asarray(True), jnp.asarray([True, False, True]), jnp.int8(-3), jnp.asarray([65535, 7], jnp.uint16),
              jnp.int32(-7), jnp.asarray([[1.5, -np.inf], [np.nan, -0.0]], jnp.float32), jnp.float16(0.1),
              jnp.arange(40.0), jnp.int64(-2**40), jnp.linspace(-1.0, 1.0, 70), jnp.asarray([3, 4, 5], jnp.int32)]
    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    assert _allsave._Bytes.takes(specs)
    assert not _allsave._Bytes.takes([jax.ShapeDtypeStruct((2,), jnp.complex64)])
    packer = _allsave._Bytes(specs)
    vector = packer.pack(leaves)
    assert vector.dtype == jnp.uint8 and vector.shape == (sum(x.nbytes for x in leaves),)
    pieces = packer.pieces(leaves)
    assert len(pieces) > 2  # 1,046 bytes: several pieces, one of them a single 560-byte leaf
    ends = np.cumsum([len(p) for p in pieces])
    assert packer.spans == [(int(end - len(p)), len(p)) for end, p in zip(ends, pieces)] and ends[-1] == packer.size
    assert all(len(p) <= 512 or len(group) == 1 for p, group in zip(pieces, packer.groups))
    for back in (packer.unpack(vector), packer.from_pieces(pieces)):
        for x, y in zip(leaves, back):
            assert (x.shape, x.dtype) == (y.shape, y.dtype)
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _ring_bytes(store, vmapped):
    return fusedrk.AllSaveAdjoint.bytes_per_step(
        diffrax.ODETerm(_ring), diffrax.Dopri5(), 0.0, 2.0, 0.05, jnp.ones(10), jnp.asarray(1.0), store=store,
        vmapped=vmapped, stepsize_controller=diffrax.PIDController(rtol=1e-7, atol=1e-9),
        saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, 11)), max_steps=64)


def test_what_a_step_stores_alone_and_under_vmap():
    # Inputs: the state and the FSAL derivative (10 floats each), a few scalars of time and
    # controller, the ts array; not the 11 x 10 saved values, which the step only writes
    # (found through the loop inside the step that saves them: _liveness._while_reads).
    inputs = _ring_bytes("inputs", vmapped=False)
    assert 2 * 10 * 4 <= inputs <= 2 * 10 * 4 + 11 * 4 + 24 * 8, inputs
    residuals = _ring_bytes("residuals", vmapped=False)
    assert residuals > 5 * inputs, (residuals, inputs)  # the stages' and the field's linearisations
    assert _ring_bytes("auto", vmapped=False) == residuals
    assert _ring_bytes("residuals", vmapped=True) == residuals
    assert _ring_bytes("inputs", vmapped=True) == inputs
    assert _ring_bytes("auto", vmapped=True) == (inputs if jax.default_backend() == "cpu" else residuals)


def test_store_is_checked():
    with pytest.raises(ValueError, match="'auto', 'residuals' or 'inputs'"):
        fusedrk.AllSaveAdjoint(store="everything")


@pytest.mark.parametrize("store", ["auto", "residuals", "inputs"])
def test_each_store_under_vmap_and_alone_equals_direct_adjoint(x64, store):
    # Lanes stop at different steps (mu from 0.5 to 3); every store gives DirectAdjoint's
    # gradient, vmapped and one lane alone.
    def loss(y0, mu, adjoint):
        sol = diffrax.diffeqsolve(diffrax.ODETerm(_ring), diffrax.Dopri5(), 0.0, 2.0, 0.05, y0, mu, adjoint=adjoint,
                                  stepsize_controller=diffrax.PIDController(rtol=1e-7, atol=1e-9),
                                  saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, 5)), max_steps=128)
        return jnp.sum(jnp.sin(sol.ys)), sol.stats["num_steps"]

    def grads(adjoint, y0, mu, vmapped):
        fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        fn = jax.vmap(fn, in_axes=(0, 0, None)) if vmapped else fn
        return jax.jit(fn, static_argnums=2)(y0, mu, adjoint)

    y0 = 1.0 + 0.1 * jnp.arange(30.0).reshape(3, 10) / 30
    mu = jnp.asarray([0.5, 1.5, 3.0])
    (_, steps), ours = grads(fusedrk.AllSaveAdjoint(store=store), y0, mu, True)
    (_, ref_steps), ref = grads(diffrax.DirectAdjoint(), y0, mu, True)
    assert len(set(np.asarray(steps).tolist())) > 1
    np.testing.assert_array_equal(steps, ref_steps)
    assert_tree_close(ours, ref, rtol=1e-12)
    (_, one_steps), one = grads(fusedrk.AllSaveAdjoint(store=store), y0[1], mu[1], False)
    assert int(one_steps) == int(steps[1])
    assert_tree_close(one, jax.tree_util.tree_map(lambda x: x[1], ref), rtol=1e-12)


def test_storing_inputs_evaluates_each_step_once_more():
    # store="inputs" (the default under jax.vmap on a CPU) linearises each step again from its
    # stored inputs in the backward pass: the field's evaluations at most double, and no step
    # is re-run from an earlier one (RecursiveCheckpointAdjoint's re-runs cost more).
    counted = CountedField()

    def count(adjoint, grad):
        def loss(y0, k):
            return jnp.sum(diffrax.diffeqsolve(diffrax.ODETerm(counted), diffrax.Tsit5(), 0.0, 2.0, 0.1, y0, k,
                                               adjoint=adjoint, max_steps=64).ys)

        return counted.count(jax.jit(jax.grad(loss, argnums=(0, 1)) if grad else loss), jnp.ones(2), jnp.asarray(0.5))

    forward = count(fusedrk.AllSaveAdjoint(store="inputs"), grad=False)
    assert forward > 20
    assert forward < count(fusedrk.AllSaveAdjoint(store="inputs"), grad=True) <= 2 * forward


def test_a_buffer_written_inside_a_nested_loop_is_write_only(monkeypatch):
    # log is written only, inside a while loop whose counter the body also uses: the loop's
    # other output is live, and log must still be found write-only (_liveness._while_reads
    # follows a while loop carry by carry; counting every input of a live loop as read kept
    # diffrax's saved values in every stored step).
    def body(c):
        i, acc, log = c
        # As diffrax's loop saving at ts inside a step: an all-save loop itself.
        j, log = _allsave.all_save_while_loop(lambda d: d[0] < i % 2 + 1, lambda d: (d[0] + 1, d[1].at[d[0]].set(acc)),
                                              (jnp.int32(0), log), max_steps=6, store_inputs=True)
        return i + 1, acc * 0.5 + jnp.sin(acc) * j, log

    init = (jnp.int32(0), jnp.asarray(0.3), jnp.zeros(6))
    assert _write_only_found(monkeypatch, body, init) == {1}  # moving floats in order: acc, log


def test_liveness_follows_a_while_loop_carry_by_carry():
    # Carries: i (the condition reads it), a, c (feeds a), w (written only: not needed for
    # a); b feeds c (JAX makes it, unchanged by the body, a constant of the loop, as it does k).
    from fusedrk import _liveness

    def fn(i, a, b, c, w, k):
        def body(s):
            i, a, b, c, w = s
            return i + 1, a + c * k, b, b * 2.0, w + a

        return jax.lax.while_loop(lambda s: s[0] < 3, body, (i, a, b, c, w))

    jaxpr = jax.make_jaxpr(fn)(0, 1.0, 2.0, 3.0, 4.0, 5.0).jaxpr
    i, a, b, c, w, k = jaxpr.invars
    live = _liveness.live_inputs(jaxpr, [jaxpr.outvars[1]])  # the loop's a
    assert {i, a, b, c, k} <= live and w not in live
    live = _liveness.live_inputs(jaxpr, [jaxpr.outvars[4]])  # w reads a, and so everything a reads
    assert {i, a, b, c, k, w} <= live
    live = _liveness.live_inputs(jaxpr, [jaxpr.outvars[2]])  # b, unchanged, is not even a carry
    assert b in live and not {i, a, c, w, k} & live


_VMAPPED = [("tsit5-pid", "steps"), ("heun-fixed", "ts"), ("dopri5-pid", "t1"), ("euler-fixed", "ts")]


@pytest.mark.parametrize("name, saveat", _VMAPPED, ids=[f"{n}-{s}" for n, s in _VMAPPED])
def test_vmapped_gradients_equal_direct(x64, name, saveat):
    # Under jax.vmap on a CPU each step stores its inputs (store="auto"): FSAL and non-FSAL
    # tableaux, fixed and adaptive steps, saving at t1, at ts and at every step (whose buffer
    # of max_steps saved states each step only writes, and does not store).
    solver, controller = _SOLVERS[name]
    saveat = {"t1": diffrax.SaveAt(t1=True), "ts": diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, 5)),
              "steps": diffrax.SaveAt(steps=True)}[saveat]
    scales = jnp.asarray([0.8, 1.0, 1.3])
    ours = jax.vmap(_grads(solver, controller, saveat, fusedrk.AllSaveAdjoint()))(scales)
    direct = _grads(solver, controller, saveat, diffrax.DirectAdjoint())
    noise = 0.0 if isinstance(controller, diffrax.ConstantStepSize) else _rounding_spread(direct)
    assert_tree_close(ours, jax.vmap(direct)(scales), rtol=max(1e-12, 10 * noise))


@pytest.mark.parametrize("store", ["auto", "inputs"])
def test_jacrev_with_each_store(x64, store):
    # jax.jacrev vmaps the backward pass over cotangents while the forward ran unvmapped: the
    # vmapped backward must read the rows the unvmapped forward wrote (residuals with "auto",
    # which stores inputs only when the forward itself is vmapped; inputs with "inputs").
    def solve(y0, mu, adjoint):
        return diffrax.diffeqsolve(diffrax.ODETerm(_ring), diffrax.Dopri5(), 0.0, 2.0, 0.05, y0, mu, adjoint=adjoint,
                                   stepsize_controller=diffrax.PIDController(rtol=1e-7, atol=1e-9),
                                   saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, 3)), max_steps=64).ys

    y0, mu = 1.0 + 0.1 * jnp.arange(10.0) / 10, jnp.asarray(1.5)
    jac = jax.jit(jax.jacrev(solve, argnums=(0, 1)), static_argnums=2)
    assert_tree_close(jac(y0, mu, fusedrk.AllSaveAdjoint(store=store)), jac(y0, mu, diffrax.DirectAdjoint()),
                      rtol=1e-12)
