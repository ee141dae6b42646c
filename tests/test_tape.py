"""The tape ring and its segment checkpoints (fusedrk/_schedule.py).

A solve of N iterations with a ring of R = tape_rows rows is differentiated by sweeping the
last R iterations from the ring and re-running the earlier ones once from their segments'
checkpoints. So the values and gradients must not depend on R at all, the reverse pass must
replay exactly the first N - R iterations (none when N <= R), and the memory the compiled
gradient takes must stop growing with max_steps once the ring fills its budget.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedrk
from fusedrk import _schedule, _solve, _uninitialised, kernels
from fusedrk.kernels import _triton
from conftest import F64_TOL, CountedField, assert_tree_close, float_tol


def _field(t, y, args):
    """Lorenz-like, with a per-lane and a shared argument and an explicit time dependence."""
    x, u, z = y
    rho, sigma = args
    return sigma * (u - x), x * (rho - z) - u + 0.1 * jnp.sin(t), x * u - 8.0 / 3.0 * z


def _problem(B):
    rng = np.random.RandomState(0)
    y0 = tuple(jnp.asarray(rng.uniform(0.5, 1.5, B)) for _ in range(3))
    rho = jnp.linspace(20.0, 30.0, B)
    return y0, (rho, jnp.asarray(10.0))


# name: (t0, t1, solve keywords). Every case has several segments at tape_rows = 7.
CASES = {
    "fixed-ts": (0.0, 0.6, dict(dt0=0.025, ts=np.asarray([0.0, 0.13, 0.13, 0.6]))),
    # 129 lanes: two lane tiles of 128 in the kernels, whose loops end at different iterations.
    "adaptive-t1-backward": (0.5, 0.0, dict(dt0=-0.01, rtol=1e-7, atol=1e-7)),
    # One lane (the largest rho, the fastest) runs out of steps; the others finish.
    "adaptive-ts-max-steps": (0.0, 0.5, dict(dt0=0.01, rtol=1e-8, atol=1e-8, max_steps=80, throw=False,
                                              ts=np.linspace(0.0, 0.5, 6))),
}


def _run(case, backend, tape_rows):
    t0, t1, kw = CASES[case]
    B = 129 if case == "adaptive-t1-backward" else 5
    y0, args = _problem(B)

    def loss(y0, args):
        sol = fusedrk.solve(_field, y0, t0, t1, args=args, args_axes=(0, None), tape_rows=tape_rows,
                            backend=backend, interpret=backend == "pallas", **kw)
        total = sum(jnp.sum(jnp.where(jnp.isfinite(y), jnp.sin(y), 0.0)) for y in sol.ys)
        return total, sol

    (value, sol), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(y0, args)
    return value, sol, grads


def _iterations(sol, backend) -> np.ndarray:
    """Iterations of each lane's loop: the most steps any lane of the batch (jax backend) or
    of the lane's tile (kernels) attempted."""
    steps = np.asarray(sol.stats["num_steps"])
    if backend == "jax":
        return np.full_like(steps, steps.max())
    tile = _triton.choose_launch(len(steps), interpret=True).lane_tile
    padded = np.pad(steps, (0, -len(steps) % tile), mode="edge").reshape(-1, tile)
    return np.repeat(padded.max(axis=1), tile)[: len(steps)]


@pytest.mark.parametrize("backend", ["jax", "pallas"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_values_and_gradients_do_not_depend_on_tape_rows(x64, case, backend):
    value, sol, grads = _run(case, backend, tape_rows=None)
    iters = _iterations(sol, backend)
    N = int(iters.max())
    if case == "adaptive-t1-backward" and backend == "pallas":
        assert iters[0] != iters[-1]  # the two tiles' loops differ in length
    assert int(np.max(sol.stats["num_replayed_iterations"])) == 0  # the default fits this solve
    if case == "adaptive-ts-max-steps":
        assert np.sum(np.asarray(sol.result) == fusedrk.RESULTS.max_steps_reached) == 1
    # A segment per iteration, segments that do not divide N, and a ring that holds exactly
    # the solve (the default above holds more than N: no replay either).
    sizes = [1, 7, N]
    for R in sizes:
        v, s, g = _run(case, backend, tape_rows=R)
        np.testing.assert_array_equal(s.stats["num_steps"], sol.stats["num_steps"])
        assert_tree_close(s.ys, sol.ys, rtol=F64_TOL)
        assert_tree_close(g, grads, rtol=F64_TOL)
        np.testing.assert_allclose(v, value, rtol=F64_TOL)
        expected = np.asarray(_schedule.replayed_iterations(iters, R))
        np.testing.assert_array_equal(s.stats["num_replayed_iterations"], expected)
        assert (expected.max() == 0) == (R >= N)


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_unwritten_tape_entry_is_read(x64, monkeypatch, case):
    """On XLA:CPU the jax backend's tape is not initialised (fusedrk/_uninitialised.py): its
    unwritten rows and checkpoints hold whatever the memory held. Filled with NaN (flags True,
    integers -1) instead, every value and gradient must stay the same, for rings that hold
    the solve and rings that replay."""
    if jax.default_backend() == "cpu":
        assert _uninitialised._custom_call_works()  # the pinned jaxlib takes the no-op call
    monkeypatch.setattr(_uninitialised, "MIN_BYTES", 0)  # these small tapes too
    for R in (1, None):  # a segment per iteration (every checkpoint used), and no replay
        value, sol, grads = _run(case, "jax", R)
        monkeypatch.setattr(_uninitialised, "FILL_FOR_TESTS", True)
        v, s, g = _run(case, "jax", R)
        monkeypatch.setattr(_uninitialised, "FILL_FOR_TESTS", None)
        np.testing.assert_array_equal(s.stats["num_steps"], sol.stats["num_steps"])
        assert_tree_close(s.ys, sol.ys, rtol=F64_TOL)
        assert_tree_close(g, grads, rtol=F64_TOL)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(g))


def test_no_unwritten_tape_entry_is_read_under_vmap(x64, monkeypatch):
    """jax.vmap of a solve: the batched loops run as long as the longest instance, and an
    instance that has finished sweeps rows it never wrote (their results are discarded)."""
    y0, (rho, sigma) = _problem(3)

    def loss(scale):
        sol = fusedrk.solve(_field, y0, 0.0, 0.3, args=(rho * scale, sigma), args_axes=(0, None),
                            dt0=0.01, rtol=1e-7, atol=1e-7, tape_rows=12, backend="jax")
        return sum(jnp.sum(jnp.sin(y)) for y in sol.ys)

    monkeypatch.setattr(_uninitialised, "MIN_BYTES", 0)
    scales = jnp.asarray([0.05, 1.0])
    steps = [int(np.max(fusedrk.solve(_field, y0, 0.0, 0.3, args=(rho * c, sigma), args_axes=(0, None), dt0=0.01,
                                      rtol=1e-7, atol=1e-7).stats["num_steps"])) for c in scales]
    assert steps[0] < 12 < steps[1], steps  # one instance fits its ring, the other replays
    expected = jax.jit(jax.vmap(jax.grad(loss)))(scales)
    monkeypatch.setattr(_uninitialised, "FILL_FOR_TESTS", True)
    np.testing.assert_allclose(jax.jit(jax.vmap(jax.grad(loss)))(scales), expected, rtol=F64_TOL)
    assert np.all(np.isfinite(expected))


@pytest.mark.parametrize("backend", ["jax", "pallas"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_the_backward_replays_each_iteration_at_most_once(x64, monkeypatch, backend, adaptive):
    # Field evaluations, counted by a host callback (B = 1: one callback per evaluation). The
    # kernels do not lower host callbacks on a GPU; in interpret mode they run, so let one in.
    monkeypatch.setattr(kernels._grid, "PASSTHROUGH", kernels._grid.PASSTHROUGH | {"debug_callback"})
    counted = CountedField()
    y0, k = jnp.ones(1), jnp.full((1,), 0.5)
    tol = dict(rtol=1e-6, atol=1e-8) if adaptive else {}
    kw = dict(args=k, args_axes=0, dt0=0.1, backend=backend, interpret=backend == "pallas", **tol)

    def loss(y0, k, R):
        return jnp.sum(fusedrk.solve(counted, y0, 0.0, 2.0, tape_rows=R, **{**kw, "args": k}).ys)

    sol = fusedrk.solve(counted, y0, 0.0, 2.0, **kw)
    N = int(sol.stats["num_steps"][0])
    forward = counted.count(jax.jit(lambda y0: fusedrk.solve(counted, y0, 0.0, 2.0, **kw).ys), y0)
    assert forward == 1 + 6 * N
    for R in (N + 3, N, N - 1, 5, 1):
        with_grad = counted.count(jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2), y0, k, R)
        replayed = with_grad - 2 * forward  # forward + one VJP per evaluation, plus replays
        assert replayed % 6 == 0, (R, replayed)
        replayed //= 6
        if R >= N:
            assert replayed == 0, R
        else:
            # Every iteration before the last R, once.
            assert replayed == N - R, (R, replayed)
            assert replayed < N
        stats = fusedrk.solve(counted, y0, 0.0, 2.0, tape_rows=R, **kw).stats
        assert int(stats["num_replayed_iterations"][0]) == replayed


def test_peak_memory_stops_growing_with_max_steps(x64, monkeypatch):
    """The compiled gradient's temporaries stay within the tape budget plus what does not
    depend on max_steps, from max_steps = 64 to 65,536 (a max_steps-sized tape would need
    ~0.8 GB at 65,536)."""
    budget = 8 * 2**20
    monkeypatch.setitem(_solve.JAX_TAPE_BYTES, "cpu", budget)
    B = 64
    y0, args = _problem(B)

    def temp_bytes(max_steps):
        def loss(y0):
            sol = fusedrk.solve(_field, y0, 0.0, 1.0, args=args, args_axes=(0, None), dt0=0.01,
                                rtol=1e-6, atol=1e-6, max_steps=max_steps, backend="jax")
            return jnp.sum(sol.ys[0])

        compiled = jax.jit(jax.grad(loss)).lower(y0).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    row = _solve.tape_bytes(1, y0, 8, backend="jax", adaptive=True)
    sizes = {m: temp_bytes(m) for m in (64, 1024, 65536)}
    assert sizes[64] < budget  # 64 rows fit: the tape holds every iteration
    assert sizes[64] >= 64 * row
    for m, used in sizes.items():
        assert used <= budget + 2 * 64 * row, (m, used)  # the budget, and slack for the rest
    assert 65536 * row > 50 * budget  # what the tape would take without the ring


def test_bad_tape_rows_are_refused():
    y0 = jnp.ones(3)
    for bad in (0, -2, 2.5, True, "8"):
        with pytest.raises(ValueError, match="tape_rows must be a positive int"):
            fusedrk.solve(lambda t, y, a: -y, y0, 0.0, 1.0, dt0=0.1, tape_rows=bad)


def test_checkpoints_that_cannot_fit_are_refused_with_the_sizes(monkeypatch):
    # One row of a ring fits, but one checkpoint per iteration for max_steps does not.
    monkeypatch.setattr(_solve, "_device_memory_bytes", lambda: 2**20)
    y0 = jnp.ones(1024)
    loss = lambda y0: jnp.sum(fusedrk.solve(lambda t, y, a: -y, y0, 0.0, 1.0, dt0=0.01, rtol=1e-6,  # noqa: E731
                                            atol=1e-6, max_steps=10_000, tape_rows=1).ys)
    with pytest.raises(MemoryError, match=r"1 rows x 1024 lanes: .*; 10000 segment checkpoints"):
        jax.jit(jax.grad(loss)).lower(y0)


def test_the_automatic_rule():
    kw = dict(row_bytes=1000, checkpoint_bytes=100, budget_bytes=100_000)
    # Fixed steps with concrete times keep every iteration; an explicit value is capped.
    assert _schedule.choose_tape_rows(None, rows=5000, known_fixed=True, **kw) == 5000
    assert _schedule.choose_tape_rows(9, rows=5, known_fixed=False, **kw) == 5
    # A short solve's every row fits the budget.
    assert _schedule.choose_tape_rows(None, rows=50, known_fixed=False, **kw) == 50
    # A long one: the largest ring whose rows and checkpoints fit.
    R = _schedule.choose_tape_rows(None, rows=4096, known_fixed=False, **kw)
    total = lambda R: R * 1000 + _schedule.num_segments(4096, R) * 100  # noqa: E731
    assert total(R) <= 100_000 < total(R + 1)
    # Nothing fits: the smallest tape, about sqrt(rows x checkpoint / row), at least 16 rows.
    R = _schedule.choose_tape_rows(None, rows=10**6, known_fixed=False, **kw)
    assert R == round((10**6 * 100 / 1000) ** 0.5)
    assert _schedule.choose_tape_rows(None, rows=10**6, known_fixed=False, row_bytes=10**6,
                                      checkpoint_bytes=1, budget_bytes=1) == _schedule.MIN_AUTO_ROWS


def test_which_fields_vjp_reads_the_state():
    from fusedrk import _liveness

    def reads(field, y=jnp.ones(3), args=()):
        def lane_fn(t, y_leaves, diff, nondiff):
            return (field(t, y_leaves[0], *diff),)

        spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
        (read,) = _liveness.read_components(lane_fn, [spec(y)], [spec(a) for a in args], [],
                                            jax.ShapeDtypeStruct((), jnp.float32))
        return read

    A = jnp.eye(3)
    assert reads(lambda t, y: -0.5 * y + jnp.sin(t)) == ()  # linear in y: the seed
    assert reads(lambda t, y, A: A @ y, args=(A,)) == (0, 1, 2)  # A's cotangent is f_bar y^T
    assert reads(lambda t, y, k: -k * y, args=(jnp.asarray(2.0),)) == (0, 1, 2)
    assert reads(lambda t, y: jnp.sin(y)) == (0, 1, 2)
    assert reads(lambda t, y: y * y) == (0, 1, 2)
    assert reads(lambda t, y, k: -0.5 * y + k, args=(jnp.asarray(2.0),)) == ()  # an additive argument
    assert reads(lambda t, y: jnp.roll(y, 1) - 2.0 * y) == ()  # rearranged, still linear
    # Component by component inside a leaf: a pendulum (the velocity enters linearly) with its
    # running cost (never an input), a product of two, a parameter multiplying one.
    assert reads(lambda t, y: jnp.stack([y[1], -jnp.sin(y[0]), y[0] ** 2])) == (0,)
    assert reads(lambda t, y: jnp.array([y[0] * y[2], y[1], 1.0])) == (0, 2)
    assert reads(lambda t, y, c: _pendulum_with_cost(t, y, c), args=(jnp.asarray(2.0),)) == (0, 2)
    assert reads(lambda t, y, k: jnp.array([y[1], -k * y[2], y[0]]), args=(jnp.asarray(2.0),)) == (2,)
    assert reads(lambda t, y: jnp.stack([y[0], y[1] * y[2], y[0]])) == (1, 2)
    # Conservative: a zero coefficient still reads (0 * inf is NaN), a loop reads its whole leaf.
    assert reads(lambda t, y: jnp.sin(y) * jnp.array([1.0, 0.0, 1.0])) == (0, 1, 2)
    assert reads(lambda t, y: jax.lax.fori_loop(0, 2, lambda i, v: v * y[0], y)) == (0, 1, 2)
    # Leaves: a state of two leaves whose second the VJP never reads.
    spec = jax.ShapeDtypeStruct((2,), jnp.float32)
    assert _liveness.read_components(lambda t, y, d, n: (jnp.sin(y[0]), y[0] + y[1]), [spec, spec], [], [],
                                     jax.ShapeDtypeStruct((), jnp.float32)) == ((0, 1), ())


def _pendulum_with_cost(t, y, c):
    # [angle, running cost, velocity] with cubic drag: the VJP reads the angle and the velocity,
    # never the cost (no input of the field).
    return jnp.stack([y[2], y[0] ** 2, -c * jnp.sin(y[0]) - 0.05 * y[2] ** 3 + 0.3 * jnp.cos(2.0 * t)])


def _pendulum_leaves(t, y, c):
    # {"cost": running cost, "x": [velocity, angle]}: the VJP reads the angle only, the second
    # component of the second leaf (the kernels' third component).
    v, theta = y["x"][0], y["x"][1]
    return {"cost": theta ** 2, "x": jnp.stack([-c * jnp.sin(theta) + 0.3 * jnp.cos(2.0 * t), v])}


def _linear_field(t, y, c):
    return -0.7 * y + jnp.roll(y, 1) * 0.2 + c * jnp.sin(3.0 * t)


TAPE_CASES = [(field, stored, backend, adaptive) for field, stored, modes in (
    (_linear_field, 0, [("jax", False), ("jax", True), ("pallas", True)]),
    (_pendulum_with_cost, 2, [("jax", False)]),
    (_pendulum_leaves, 1, [("jax", True), ("pallas", True)]),
) for backend, adaptive in modes]


@pytest.mark.parametrize("field, stored, backend, adaptive", TAPE_CASES,
                         ids=[f"{f.__name__.strip('_')}-{b}-{'adaptive' if a else 'fixed'}" for f, _, b, a in TAPE_CASES])
def test_a_tape_of_the_components_the_vjp_reads_gives_the_same_gradients(x64, monkeypatch, backend, adaptive,
                                                                         field, stored):
    """The tape stores only the state components the field's VJP reads (``Config.tape_live``):
    none of a field linear in y (no differentiable argument multiplying it; the seed's whole
    tape: 52 MB -> 2 MB of temporaries at 800 steps x 2,250 lanes in float32 on the jax
    backend), two of three of a pendulum with its running cost, one of three of a pendulum
    whose state is two leaves. Values and gradients are
    exactly those of a tape that keeps every component."""
    from fusedrk import _liveness

    y0 = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, (6, 3)))
    if field is _pendulum_leaves:
        y0 = {"cost": y0[:, 0], "x": y0[:, 1:]}
    c = jnp.linspace(0.5, 1.0, 6)
    kw = dict(rtol=1e-8, atol=1e-8) if adaptive else {}

    def compiled():
        def loss(y0, c):
            sol = fusedrk.solve(field, y0, 0.0, 2.0, args=c, args_axes=0, dt0=0.05, ts=jnp.linspace(0.0, 2.0, 5),
                                max_steps=200, backend=backend, interpret=backend == "pallas", **kw)
            return sum(jnp.sum(jnp.sin(ys)) for ys in jax.tree_util.tree_leaves(sol.ys))

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return fn(y0, c), fn.lower(y0, c).compile().memory_analysis().temp_size_in_bytes

    (value, grads), lean = compiled()
    monkeypatch.setattr(_liveness, "read_components", lambda lane_fn, y_spec, *a: tuple(
        tuple(range(int(np.prod(s.shape)))) for s in y_spec))
    (ref_value, ref_grads), full = compiled()
    np.testing.assert_allclose(value, ref_value, rtol=F64_TOL)
    assert_tree_close(grads, ref_grads, rtol=F64_TOL)
    # The full tape holds 7 x (3 - stored) float64 more per lane and row than the lean one: x 6
    # lanes x its rows (max_steps adaptive; the 40 fixed steps and one spare row otherwise).
    # Less up to two rows of the stored components: a partly stored leaf is gathered into a
    # temporary before its row is written (measured: 344 bytes, the jax backend, fixed steps).
    rows = 200 if adaptive else 41
    assert full - lean >= 7 * 8 * 6 * ((3 - stored) * rows - 2 * stored), (full, lean)


def test_a_forward_solve_of_a_field_without_a_vjp_still_runs():
    # Deciding what the tape keeps traces the field's VJP; a field that has none (a host
    # callback) must still solve forwards, as it did before that decision existed.
    def field(t, y, a):
        return jax.pure_callback(lambda y: -np.asarray(y), jax.ShapeDtypeStruct(y.shape, y.dtype), y,
                                 vmap_method="sequential")

    sol = fusedrk.solve(field, jnp.ones((2, 3)), 0.0, 0.5, dt0=0.1)
    np.testing.assert_allclose(sol.ys[:, 0], np.exp(-0.5), rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fixed_step_times_computed_from_the_iteration_equal_the_carried_ones(x64, dtype):
    """Fixed-step tapes store no times: the reverse pass and replays compute iteration n's
    interval with _step.fixed_interval. It must equal, bit for bit, the interval the forward
    loop carries to iteration n (attempt_step's chain), including the first step (dt0, not a
    fraction) and the last ones (clipped to t_end within 100 ULP)."""
    from fusedrk import _step

    def mismatches(t0, t1, dt0):
        t0, t1, dt0 = (jnp.asarray(x, dtype) for x in (t0, t1, dt0))
        num, floor = _step.constant_num_steps(t0, t1, dt0), _step.end_clip_floor(t1)
        active = jnp.ones((1,), bool)
        f = lambda t, y: (jnp.zeros_like(y[0]),)  # noqa: E731

        def body(c):
            n, tprev, tnext, bad = c
            fp, fn = _step.fixed_interval(n, num, t0, t1, floor, dt0)
            step = _step.attempt_step(f, adaptive=False, active=active, tprev=tprev, tnext=tnext,
                                      y=(jnp.zeros(1, dtype),), f=(jnp.zeros(1, dtype),), direction=1,
                                      rtol=0, atol=0, t_start=t0, t_end=t1, t_end_floor=floor,
                                      num_fixed_steps=num, steps_done=n)
            bad = bad + ((fp != tprev) | (fn != tnext)).astype(jnp.int32)
            return n + 1, step.tprev, step.tnext, bad

        init = (jnp.int32(0), t0, jnp.minimum(t0 + dt0, t1), jnp.int32(0))
        n, _, _, bad = jax.jit(lambda: jax.lax.while_loop(lambda c: c[1] < t1, body, init))()
        return int(n), int(bad)

    for t0, t1, dt0 in [(0.0, 1.0, 0.01), (0.0, 80.0, 0.1), (0.3, 1.7, 0.013), (0.0, 1.0, 0.3),
                        (0.0, 1.0, 1 / 3), (0.0, 1.0, 0.001), (0.0, 1.0, 2.0)]:
        n, bad = mismatches(t0, t1, dt0)
        assert n >= 1 and bad == 0, (t0, t1, dt0, n, bad)


def test_a_fixed_step_gradient_is_the_same_whether_times_are_known_or_traced(x64):
    """The reverse pass recomputes fixed-step times; with times known at trace time XLA may
    compile that arithmetic differently from the forward's (a division by the constant step
    count becomes a product with its reciprocal: 1 ULP off at t = 0.3 on [0, 0.5] with dt0 =
    0.1). The gradient must be bit for bit the one computed from traced times. (Only the jax
    backend: in the kernels, interpret mode included, the step count is a kernel input, and
    their forward values themselves move by rounding between the two cases.)"""
    y0, args = _problem(5)

    def grad_of(t1):
        def loss(y0, args, t0, t1, dt0):
            sol = fusedrk.solve(_field, y0, t0, t1, args=args, args_axes=(0, None), dt0=dt0, backend="jax")
            return sum(jnp.sum(y) for y in sol.ys)

        known = jax.jit(jax.grad(lambda y0, args: loss(y0, args, 0.0, t1, 0.1), argnums=(0, 1)))(y0, args)
        traced = jax.jit(jax.grad(loss, argnums=(0, 1)))(y0, args, 0.0, t1, 0.1)
        return known, traced

    for t1 in (0.5, 2.0):
        known, traced = grad_of(t1)
        for a, b in zip(jax.tree_util.tree_leaves(known), jax.tree_util.tree_leaves(traced)):
            np.testing.assert_array_equal(a, b)


def _blows_up(t, y, args):
    return y * y  # y0 > 0 reaches inf in finite time: lanes fail at different iterations


def _vdp(t, y, args):
    return jnp.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])


_VDP_Y0 = jnp.stack([jnp.linspace(0.5, 2.0, 5), jnp.zeros(5)], axis=1)
# name: (field, y0, t0, t1, solve keywords)
LEAN_CASES = {
    "t1": (_vdp, _VDP_Y0, 0.0, 3.0, dict(dt0=0.1)),
    "ts": (_vdp, _VDP_Y0, 0.0, 3.0, dict(dt0=0.1, ts=[0.0, 0.05, 0.3, 0.31, 0.32, 1.7, 3.0])),
    "ts-backwards": (_vdp, _VDP_Y0, 3.0, 0.0, dict(dt0=-0.07, ts=[3.0, 2.5, 1.0, 0.0])),
    "blow-up-t1": (_blows_up, [0.1, 0.5, 1.0, 2.0, -1.0, np.nan], 0.0, 3.0, dict(dt0=0.01)),
    "blow-up-ts": (_blows_up, [0.1, 0.5, 1.0, 2.0, -1.0, np.nan], 0.0, 3.0, dict(dt0=0.01, ts=np.linspace(0, 3, 7))),
    "max-steps-t1": (_vdp, _VDP_Y0, 0.0, 3.0, dict(dt0=0.1, max_steps=7)),
    "max-steps-ts": (_vdp, _VDP_Y0, 0.0, 3.0, dict(dt0=0.1, max_steps=7, ts=[0.2, 0.5, 2.0])),
    "empty-t1": (_vdp, _VDP_Y0, 1.0, 1.0, dict(dt0=0.1)),
    "empty-ts": (_vdp, _VDP_Y0, 1.0, 1.0, dict(dt0=0.1, ts=[1.0, 1.0])),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", sorted(LEAN_CASES))
def test_the_lean_fixed_step_forward_equals_the_general_one(x64, monkeypatch, dtype, case):
    """A fixed-step forward that stores nothing per iteration runs _reference._lean_forward:
    times from the iteration, the FSAL derivative recomputed, failures noticed one iteration
    late. Step counts, results, times and which lanes are finite must be exactly the general
    loop's, the values equal to rounding, including lanes that become non-finite at different
    iterations, a NaN initial state, runs out of steps, saves in the same step and none, and
    t0 == t1. (Rounding, not bits: XLA:CPU contracts multiplies and adds into fused
    multiply-adds within one fusion, and the lean step is one fusion where the general step is
    several; float32 values differ in the last bit now and then.)"""
    from fusedrk import _reference

    field, y0, t0, t1, kw = LEAN_CASES[case]
    y0 = jnp.asarray(y0, dtype)
    kw = {k: (jnp.asarray(v, dtype) if k == "ts" else v) for k, v in kw.items()}
    lean_calls = []
    lean = _reference._lean_forward
    monkeypatch.setattr(_reference, "_lean_forward", lambda *a, **k: lean_calls.append(1) or lean(*a, **k))

    def solve():
        return fusedrk.solve(field, y0, t0, t1, backend="jax", throw=False, **kw)

    got = solve()
    monkeypatch.setattr(_reference, "stores_rows", lambda config, with_tape: True)  # the general loop
    jax.clear_caches()
    want = solve()
    assert lean_calls == [1]
    np.testing.assert_array_equal(np.isfinite(got.ys), np.isfinite(want.ys))
    steps = int(np.max(want.stats["num_steps"]))
    assert_tree_close(got.ys, want.ys, float_tol(jnp.dtype(dtype), max(steps, 1)))
    for a, b in zip(jax.tree_util.tree_leaves((got.ts, got.stats, got.result, got.t_final)),
                    jax.tree_util.tree_leaves((want.ts, want.stats, want.result, want.t_final))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_gradient_whose_tape_is_empty_runs_lean_loops_equal_to_the_general_ones(x64, monkeypatch, dtype):
    """The field's VJP reads no state, so a fixed-step gradient stores nothing per iteration:
    its forward is _lean_forward and its reverse sweep the lean one (each FSAL cotangent
    applied at once, no ring, no replays). Gradients with respect to y0 and to per-lane and
    shared arguments must equal the general loops' to rounding, saving at t1 or at ts (two
    saves in one step when backwards, a save at t0), forwards and backwards in time, with a
    lane that fails at once (infinite y0, cotangents masked), one that fails half way (so the
    sweep's masked iterations and its unmasked ones, below every lane's failure, both run),
    out of steps, and t0 == t1."""
    from fusedrk import _reference, _schedule

    def field(t, y, a):
        # The lane with a = 2 (per-lane arguments) fails once t passes 1.2 (at once backwards).
        return -0.3 * y + jnp.sin(t) * a + jnp.where((t > 1.2) & (a > 1.9), jnp.inf, 0.0)

    calls = []
    real_lean = _reference._lean_forward
    monkeypatch.setattr(_reference, "_lean_forward", lambda *a_, **k: calls.append(1) or real_lean(*a_, **k))
    sweeps = []
    real_loop = _schedule.reverse_loop
    monkeypatch.setattr(_schedule, "reverse_loop", lambda *a_, **k: sweeps.append(1) or real_loop(*a_, **k))

    def grad(y0, a, a_axes, ts, t0, t1, dt0, max_steps=4096):
        def loss(y0, a):
            sol = fusedrk.solve(field, y0, t0, t1, args=a, args_axes=a_axes, dt0=dt0, ts=ts, backend="jax",
                                max_steps=max_steps, throw=False)
            # A non-finite output gets the cotangent 1 (its value is NaN), so a failed lane's
            # cotangent is nonzero in the iterations after its failure, which must mask it.
            finite = jnp.isfinite(sol.ys)
            return jnp.sum(jnp.where(finite, jnp.where(finite, sol.ys, 0) ** 2, sol.ys - jax.lax.stop_gradient(sol.ys)))
        return jax.grad(loss, argnums=(0, 1))(y0, a)

    y0 = jnp.linspace(0.5, 2.0, 6, dtype=dtype)
    a = jnp.linspace(1.0, 2.0, 6, dtype=dtype)
    ts = jnp.asarray([0.0, 0.5, 1.0, 1.05, 2.9], dtype)
    cases = [(y0, a, 0, None, 0.0, 2.9, 0.1),
             (y0, jnp.asarray(1.5, dtype), None, ts, 0.0, 2.9, 0.1),
             (y0, a, 0, ts[::-1], 2.9, 0.0, -0.1),
             (y0.at[2].set(jnp.inf), jnp.asarray(1.5, dtype), None, ts, 0.0, 2.9, 0.1),
             (y0, a, 0, ts, 0.0, 2.9, 0.1, 12),
             (y0, a, 0, jnp.asarray([1.0, 1.0], dtype), 1.0, 1.0, 0.1)]
    for case in cases:
        got = grad(*case)
        assert (len(calls), len(sweeps)) == (1, 0)
        with monkeypatch.context() as m:
            m.setattr(_reference, "stores_rows", lambda config, with_tape: True)  # the general loops
            want = grad(*case)
        assert len(sweeps) == 1
        calls.clear(), sweeps.clear()
        assert_tree_close(got, want, float_tol(jnp.dtype(dtype), 2 * 29))


def test_the_lean_loops_under_vmap_equal_separate_solves(x64):
    """jax.vmap over t1 of a fixed-step solve and its gradient (a field whose VJP reads no
    state: the lean loops). The batch elements run different numbers of iterations, so the
    batched loops run on with some elements finished (the reverse sweep at n < 0 for those).
    Each element must equal its own solve."""

    def field(t, y, a):
        return -0.3 * y + jnp.sin(t) * a

    y0, a = jnp.linspace(0.5, 2.0, 4), jnp.linspace(1.0, 2.0, 4)
    t1s = [0.6, 1.0, 1.55]
    for ts in (None, jnp.asarray([0.3, 0.5, 0.5])):
        def solve(t1, y0, a):
            return fusedrk.solve(field, y0, 0.0, t1, args=a, args_axes=0, dt0=0.1, ts=ts, backend="jax")

        def loss(t1, y0, a):
            return jnp.sum(solve(t1, y0, a).ys ** 2)

        ys = jax.vmap(lambda t1: solve(t1, y0, a).ys)(jnp.asarray(t1s))
        grads = jax.vmap(jax.grad(loss, argnums=(1, 2)), in_axes=(0, None, None))(jnp.asarray(t1s), y0, a)
        for i, t1 in enumerate(t1s):
            assert_tree_close(ys[i], solve(t1, y0, a).ys, F64_TOL)
            assert_tree_close((grads[0][i], grads[1][i]), jax.grad(loss, argnums=(1, 2))(t1, y0, a), F64_TOL)


@pytest.mark.parametrize("num_iters, R", [(0, 3), (1, 3), (3, 3), (7, 3), (8, 3), (9, 1), (5, 8)])
def test_the_pipelined_reverse_walk_visits_what_the_plain_one_does(num_iters, R):
    # _schedule.reverse_loop with ``load`` (the reverse kernel's prefetch) must visit the same
    # (n, row) in the same order as without it, hand each visit load(n, row) of its own
    # iteration and row, and load only rows 0 .. R - 1. The ring's content stands for "written
    # by the latest replay".
    N = 16

    def walk(pipelined):
        def replay(c, segment, start, count):
            ring = jnp.where(jnp.arange(R) < count, 1000 * (segment + 1) + jnp.arange(R), -1)
            return {**c, "ring": ring}

        def record(c, n, row, got):
            i = c["i"]
            return {**c, "i": i + 1, "n": c["n"].at[i].set(n), "row": c["row"].at[i].set(row),
                    "got": c["got"].at[i].set(got), "bad": c["bad"]}

        def load(n, row):
            return ring_ref[0]["ring"][row], n, (row < 0) | (row >= R)

        ring_ref = [None]

        def sweep_plain(c, n, row):
            return record(c, n, row, c["ring"][row])

        def sweep_pipelined(c, n, row, loaded):
            value, loaded_n, out_of_range = loaded
            return {**record(c, n, row, value), "bad": c["bad"] | out_of_range | (loaded_n != n)}

        carry = {"i": jnp.int32(0), "n": jnp.full(N, -9), "row": jnp.full(N, -9), "got": jnp.full(N, -9),
                 "ring": 7 * jnp.arange(R), "bad": jnp.asarray(False)}
        if not pipelined:
            return _schedule.reverse_loop(num_iters, R, carry, replay=replay, sweep=sweep_plain)

        # load() reads the ring as the latest replay left it (the kernel's ring is memory).
        def replay_and_remember(c, segment, start, count):
            c = replay(c, segment, start, count)
            ring_ref[0] = c
            return c

        ring_ref[0] = carry
        return _schedule.reverse_loop(num_iters, R, carry, replay=replay_and_remember, sweep=sweep_pipelined,
                                      load=load)

    plain, pipelined = walk(False), walk(True)
    assert not bool(pipelined["bad"])
    for key in ("i", "n", "row", "got"):
        np.testing.assert_array_equal(pipelined[key], plain[key], err_msg=key)
    assert int(plain["i"]) == num_iters
