"""The Pallas kernels compute what the jax backend computes, and lower to Triton.

The same assertions run in interpret mode on every machine (class TestInterpret) and compiled
on a GPU (class TestCompiled, marker ``gpu``, skipped without one). Sizes are small: interpret
mode runs the kernel body as ordinary JAX ops, one tile after another.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedrk
from fusedrk import _reference, kernels, problems
from conftest import F64_TOL, assert_tree_close, diffrax_solve

HAS_GPU = jax.default_backend() == "gpu"


def _loss(ys):
    leaves = jax.tree_util.tree_leaves(ys)
    return sum(jnp.sum(jnp.sin(x) * (1.0 + jnp.arange(x.size).reshape(x.shape) / x.size)) for x in leaves)


CASES = {
    # name: (problem, B, t0, t1, solve keywords)
    "fixed-ts-mixed-args": (problems.LOTKA_VOLTERRA, 7, 0.0, 2.0, dict(dt0=0.1, ts=jnp.asarray([0.0, 0.7, 0.7, 2.0]))),
    "adaptive-dict-state": (problems.VDP, 7, 0.0, 3.0, dict(dt0=0.01, rtol=1e-6, atol=1e-6, ts=jnp.linspace(0.0, 3.0, 5))),
    "adaptive-t1-only-one-lane": (problems.DECAY, 1, 0.0, 3.0, dict(dt0=0.1, rtol=1e-7, atol=1e-9)),
    "fixed-two-tiles": (problems.DECAY, 129, 0.0, 1.0, dict(dt0=0.1, ts=jnp.asarray([0.5, 1.0]))),
    "backward-adaptive": (problems.DECAY, 5, 2.0, 0.0, dict(dt0=-0.1, rtol=1e-7, atol=1e-9, ts=jnp.asarray([2.0, 1.1, 0.0]))),
    "adaptive-no-dt0": (problems.LORENZ, 3, 0.0, 0.3, dict(rtol=1e-6, atol=1e-6)),
    "backward-adaptive-no-dt0": (problems.DECAY, 3, 2.0, 0.0, dict(rtol=1e-7, atol=1e-9, ts=jnp.asarray([2.0, 0.5]))),
    "t0-equals-t1": (problems.DECAY, 3, 1.0, 1.0, dict(dt0=0.1, ts=jnp.asarray([1.0, 1.0]))),
}


def _lotka_scalar_field(t, y, args):
    prey, predator = y
    return (args["a"] * prey - args["b"] * prey * predator, args["d"] * prey * predator - args["g"] * predator)


def _setup(case, dtype):
    problem, B, t0, t1, kw = CASES[case]
    y0, args = problem.make(B, dtype)
    field = problem.field
    if problem is problems.LOTKA_VOLTERRA:  # the kernels take scalar leaves: split the [B, 2] state
        y0, field = (y0[:, 0], y0[:, 1]), _lotka_scalar_field
    return field, y0, args, problem.args_axes, t0, t1, kw


class _Agreement:
    interpret: bool

    def solve(self, field, y0, t0, t1, **kw):
        return fusedrk.solve(field, y0, t0, t1, backend="pallas", interpret=self.interpret, **kw)

    @pytest.mark.parametrize("case", sorted(CASES))
    def test_forward_and_gradient_equal_the_jax_backend(self, x64, case):
        field, y0, args, axes, t0, t1, kw = _setup(case, jnp.float64)
        ours = self.solve(field, y0, t0, t1, args=args, args_axes=axes, **kw)
        ref = fusedrk.solve(field, y0, t0, t1, args=args, args_axes=axes, backend="jax", **kw)
        for key in ref.stats:
            np.testing.assert_array_equal(ours.stats[key], ref.stats[key])
        np.testing.assert_array_equal(ours.result, ref.result)
        assert_tree_close(ours.ys, ref.ys, rtol=1e-12)

        def loss(solve_fn, y0, args):
            return _loss(solve_fn(field, y0, t0, t1, args=args, args_axes=axes, **kw).ys)

        g_ours = jax.grad(functools.partial(loss, self.solve), argnums=(0, 1))(y0, args)
        g_ref = jax.grad(functools.partial(loss, functools.partial(fusedrk.solve, backend="jax")),
                         argnums=(0, 1))(y0, args)
        assert_tree_close(g_ours, g_ref, rtol=1e-12)

    def test_float32_matches_diffrax(self):
        p = problems.LORENZ
        y0, rho = p.make(9, jnp.float32)
        kw = dict(dt0=0.01, ts=jnp.asarray([0.1, 0.2]))
        ours = self.solve(p.field, y0, 0.0, 0.2, args=rho, args_axes=0, **kw)
        ref = diffrax_solve(p.field, y0, 0.0, 0.2, args=rho, args_axes=0, **kw)
        np.testing.assert_array_equal(ours.stats["num_steps"], ref.stats["num_steps"])
        assert_tree_close(ours.ys, ref.ys, rtol=10 * float(jnp.finfo(jnp.float32).eps) * 20)

    def test_lane_hitting_max_steps(self, x64):
        # float64: in float32 the first lane's last step sits so near error = 1 that rounding
        # decides it (4 steps with float64 times or in the jax backend, 5 in diffrax with
        # float32 times), which says nothing about lanes that run out of steps.
        p = problems.DECAY
        y0, args = p.make(3, jnp.float64)
        args = dict(args, k=jnp.asarray([0.1, 50.0, 80.0]))
        kw = dict(args=args, args_axes=p.args_axes, dt0=0.1, rtol=1e-5, atol=1e-5, max_steps=20,
                  throw=False, ts=jnp.asarray([0.05, 3.0]))
        ours = self.solve(p.field, y0, 0.0, 3.0, **kw)
        ref = fusedrk.solve(p.field, y0, 0.0, 3.0, backend="jax", **kw)
        np.testing.assert_array_equal(ours.result, [0, 1, 1])
        np.testing.assert_array_equal(ours.stats["num_steps"], ref.stats["num_steps"])
        np.testing.assert_array_equal(np.isinf(ours.ys), np.isinf(ref.ys))  # inf where never saved
        assert int(np.sum(np.isinf(ours.ys))) == 2
        assert_tree_close(ours.ys, ref.ys, rtol=F64_TOL)


class TestInterpret(_Agreement):
    interpret = True


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
class TestCompiled(_Agreement):
    interpret = False


def _where_field(t, y, a):
    return (jnp.where(y[0] > 1.0, -a * y[0] * y[0], -a * y[0]) + jnp.sin(t),)  # continuous at 1


def _clip_field(t, y, a):
    return (jnp.clip(-a * y[0], -0.8, 0.8) + 0.1 * jnp.cos(t),)


def _softplus_field(t, y, a):
    return (-jax.nn.softplus(a * y[0]) + jax.nn.sigmoid(t) * jax.nn.relu(y[0]),)


def _sharded_field(t, y, a):
    # A sharding annotation, as jax >= 0.11 writes into a field traced under a mesh wherever
    # the shared time meets a lane's value (reshard): the kernels take it as the identity.
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((1,), ("lanes",), axis_types=(jax.sharding.AxisType.Auto,))
    y = jax.lax.with_sharding_constraint(y[0], NamedSharding(mesh, PartitionSpec()))
    return (-a * y + 0.1 * jnp.sin(0.2 * t + y),)


@pytest.mark.parametrize("field, adaptive", [(f, a) for f in (_where_field, _clip_field, _softplus_field)
                                             for a in (False, True)] + [(_sharded_field, False)],
                         ids=lambda v: v.__name__[1:-6] if callable(v) else ("adaptive" if v else "fixed"))
def test_fields_with_nested_jit_run_in_the_kernels(x64, field, adaptive):
    # jnp.where, jnp.clip and jax.nn's functions trace to a nested `jit` (and custom_jvp):
    # backend="pallas" takes them (it raises for a field the kernels refuse, which
    # backend="auto" would run on "jax" instead).
    y0 = (jnp.linspace(0.5, 1.5, 5),)
    a = jnp.linspace(0.5, 2.0, 5)
    kw = dict(args=a, args_axes=0, dt0=0.1, ts=np.asarray([0.5, 1.0, 2.0]))
    if adaptive:
        kw.update(rtol=1e-8, atol=1e-8)

    def loss(backend, y0, a):
        sol = fusedrk.solve(field, y0, 0.0, 2.0, backend=backend, interpret=backend == "pallas",
                            **dict(kw, args=a))
        return _loss(sol.ys), sol

    (_, ours), g_ours = jax.value_and_grad(functools.partial(loss, "pallas"), argnums=(0, 1), has_aux=True)(y0, a)
    (_, ref), g_ref = jax.value_and_grad(functools.partial(loss, "jax"), argnums=(0, 1), has_aux=True)(y0, a)
    np.testing.assert_array_equal(ours.stats["num_steps"], ref.stats["num_steps"])
    assert_tree_close(ours.ys, ref.ys, rtol=1e-12)
    assert_tree_close(g_ours, g_ref, rtol=1e-12)


def test_padded_lanes_cannot_poison_shared_cotangents(x64):
    # Gompertz growth, dy/dt = -c y log(y), is NaN at y = 0. B = 3 lanes run in a tile of 16:
    # the 13 padded lanes must solve a real problem (a copy of the last lane), or their NaNs
    # reach the per-tile sum of the shared argument's cotangent.
    def gompertz(t, y, c):
        return -c * y * jnp.log(y)

    y0, c = jnp.asarray([0.2, 0.5, 1.5]), jnp.asarray(0.7)

    def loss(backend, y0, c):
        sol = fusedrk.solve(gompertz, y0, 0.0, 2.0, args=c, dt0=0.1, backend=backend, interpret=backend == "pallas")
        return jnp.sum(sol.ys ** 2)

    ours = jax.grad(functools.partial(loss, "pallas"), argnums=(0, 1))(y0, c)
    ref = jax.grad(functools.partial(loss, "jax"), argnums=(0, 1))(y0, c)
    assert np.all(np.isfinite(ours[1]))
    assert_tree_close(ours, ref, rtol=1e-12)


def test_auto_chooses_jax_without_a_gpu():
    if HAS_GPU:
        pytest.skip("a GPU is present")
    sol = fusedrk.solve(lambda t, y, a: -y, jnp.ones(3), 0.0, 1.0, dt0=0.1, backend="auto")
    ref = fusedrk.solve(lambda t, y, a: -y, jnp.ones(3), 0.0, 1.0, dt0=0.1, backend="jax")
    np.testing.assert_array_equal(sol.ys, ref.ys)


# Which state components the tape stores (Config.tape_live) of Lorenz as three scalar leaves
# and as one [3] leaf: all, none, some (the second not).
TAPE_LIVE = {"leaves-all": None, "leaves-none": ((), (), ()), "leaves-some": ((0,), (), (0,)),
             "vector-all": None, "vector-none": ((),), "vector-some": ((0, 2),)}


@pytest.mark.parametrize("live", TAPE_LIVE)
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("B", [7, 129])
def test_tape_bytes_is_what_each_backend_allocates(B, adaptive, live):
    p = problems.LORENZ
    y0, rho = p.make(B, jnp.float32)
    field = p.field
    if live.startswith("vector"):
        y0, field = (jnp.stack(y0, axis=1),), lambda t, y, r: jnp.stack(p.field(t, tuple(y), r))
    config = _reference.Config(adaptive=adaptive, save_ts=False, rows=10, tape_rows=4,  # 3 segments
                               tape_live=TAPE_LIVE[live])
    one = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    times = _reference.Times(direction=jnp.asarray(1), t_start=one(0.0), t_end=one(1.0), dt0=one(0.1),
                             ts=jnp.zeros((1,), jnp.float32), rtol=one(1e-6), atol=one(1e-6))

    def lane_fn(t, y, diff, nondiff):
        out = field(t, y if len(y) > 1 else y[0], diff[0])
        return tuple(jnp.broadcast_to(o, y_.shape) for o, y_ in zip(out if len(y) > 1 else (out,), y))

    def batched(t, y):
        out = jax.vmap(field, in_axes=(0 if jnp.ndim(t) else None, 0, 0))(t, y if len(y) > 1 else y[0], rho)
        return out if len(y) > 1 else (out,)

    kernel = jax.eval_shape(lambda y, r: kernels.forward(config, kernels.TileProblem(lane_fn, (0,), ()), times, y,
                                                         [r], [], with_tape=True, interpret=True), y0, rho)
    reference = jax.eval_shape(lambda y: _reference.forward(config, batched, times, y, with_tape=True), y0)
    for backend, fwd in (("pallas", kernel), ("jax", reference)):
        allocated = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(fwd.tape))
        assert fusedrk._solve.tape_bytes(4, y0, 4, backend=backend, adaptive=adaptive, segments=3,
                                         tape_live=TAPE_LIVE[live], interpret=True) == allocated, backend


def test_step_algebra_is_shared_not_copied():
    # The kernels reach the step only through fusedrk._step: no coefficients of their own.
    import inspect

    from fusedrk import _tableau

    for module in (kernels.forward, kernels.reverse):
        source = inspect.getsource(inspect.getmodule(module))
        assert "_step." in source
        for value in _tableau.A_LOWER[2] + _tableau.C[1:5]:
            assert repr(value)[:8] not in source


def _spread_field(t, y, args):
    # Gompertz growth with lanes of very different stiffness: the adaptive step counts spread
    # apart. The VJP reads the state, so the tape stores it; it is NaN at y = 0 (log).
    rate, s = args
    return -rate * y * jnp.log(y) + s * jnp.sin(y)


def test_finished_adaptive_lanes_write_no_tape_rows(x64):
    # forward.write_row: a lane writes ring rows only while it runs. Interpret mode fills an
    # output nothing wrote with NaN, so the rows a lane wrote are exactly those finite.
    B, R = 5, 160
    y0, rate = jnp.linspace(0.5, 1.5, B), jnp.geomspace(0.5, 20.0, B)
    config = _reference.Config(adaptive=True, save_ts=False, rows=R, tape_rows=R)
    one = lambda x: jnp.asarray(x, jnp.float64)  # noqa: E731
    times = _reference.Times(direction=jnp.asarray(1), t_start=one(0.0), t_end=one(2.0), dt0=one(0.05),
                             ts=jnp.zeros((1,), jnp.float64), rtol=one(1e-7), atol=one(1e-9))

    def lane_fn(t, y, diff, nondiff):
        return (jnp.broadcast_to(_spread_field(t, y[0], (diff[0], 0.3)), y[0].shape),)

    fwd = kernels.forward(config, kernels.TileProblem(lane_fn, (0,), ()), times, (y0,), [rate], [],
                          with_tape=True, interpret=True)
    ran = np.asarray(fwd.num_accepted + fwd.num_rejected)
    assert ran.max() < R and ran.max() - ran.min() > 10, ran  # lanes finish far apart, no ring reuse
    states, tape_times = np.asarray(fwd.tape.states), np.asarray(fwd.tape.times)
    for b in range(B):
        written = np.arange(R) < ran[b]
        np.testing.assert_array_equal(np.isfinite(states[:, :, b]).all(axis=1), written)
        np.testing.assert_array_equal(np.isnan(states[:, :, b]).all(axis=1), ~written)
        np.testing.assert_array_equal(np.isnan(tape_times[:, :, b]).all(axis=1), ~written)


@pytest.mark.parametrize("tape_rows", [None, 5], ids=["whole-tape", "ring-replays"])
def test_gradients_of_lanes_finishing_apart_equal_the_jax_backend(x64, tape_rows):
    # The reverse kernel loads no row a lane did not write (reverse.load_row): in interpret
    # mode those rows hold NaN, which would reach the per-lane and the shared argument's
    # cotangents through the masked VJPs. With a 5-row ring the replays write the rows again.
    y0, rate = jnp.linspace(0.5, 1.5, 5), jnp.geomspace(0.5, 20.0, 5)

    def loss(backend, y0, rate, s):
        sol = fusedrk.solve(_spread_field, y0, 0.0, 2.0, args=(rate, s), args_axes=(0, None), dt0=0.05,
                            rtol=1e-7, atol=1e-9, ts=jnp.asarray([0.3, 2.0]), tape_rows=tape_rows,
                            backend=backend, interpret=backend == "pallas")
        return _loss(sol.ys), sol

    grad = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)
    (_, ours), g_ours = grad("pallas", y0, rate, jnp.asarray(0.3))
    (_, ref), g_ref = grad("jax", y0, rate, jnp.asarray(0.3))
    steps = np.asarray(ref.stats["num_steps"])
    assert steps.max() - steps.min() > 10, steps
    np.testing.assert_array_equal(ours.stats["num_steps"], steps)
    assert all(np.all(np.isfinite(g)) for g in g_ours)
    assert_tree_close(g_ours, g_ref, rtol=1e-12)


@pytest.mark.parametrize("sms", [1, 8, 132])
def test_launch_fills_every_sm_before_growing_tiles(sms):
    # kernels/_triton.choose_launch: one lane per thread (lane_tile / 32 warps, at least one);
    # the largest tile up to 128 whose programs still cover every SM, else the smallest.
    from fusedrk.kernels import _triton

    for B in list(range(1, 300)) + [2250, 16767, 16768, 16769, 16896, 65536, 8388608]:
        launch = _triton.choose_launch(B, sms=sms)
        tile, programs = launch.lane_tile, -(-B // launch.lane_tile)
        assert launch.num_warps == max(1, tile // 32), (B, launch)
        assert 16 <= tile <= 128
        assert programs >= sms or tile == 16, (B, launch)  # no SM idle that a smaller tile would fill
        assert tile == 128 or -(-B // (2 * tile)) < sms or tile >= B, (B, launch)  # no larger tile would do
        # Interpret mode runs programs one after another: the fewest, whatever the SMs.
        assert _triton.choose_launch(B, sms=sms, interpret=True).lane_tile == min(128, max(16, 1 << (B - 1).bit_length()))
    assert _triton.choose_launch(2250, sms=132) == _triton.LaunchConfig(16, 1)  # the seed: 141 programs
    assert _triton.choose_launch(65536, sms=132) == _triton.LaunchConfig(128, 4)
    assert _triton.choose_launch(16768, sms=132) == _triton.LaunchConfig(64, 2)  # 131 programs of 128 leave an SM
    assert _triton.choose_launch(20, blocks=True, sms=sms) == _triton.LaunchConfig(16, 8)


def test_the_launch_follows_the_gpu_it_is_built_for():
    # The SM count comes from the target: the abstract H100 of a lowering without a GPU, the
    # device on a GPU, nothing without one.
    from fusedrk.kernels import _triton

    with _triton.gpu_lowering():
        assert _triton.sm_count() == 132
        assert _triton.choose_launch(2250) == _triton.LaunchConfig(16, 1)
        assert _triton.padded_batch(2250) == 2256 and _triton.padded_batch(2250, interpret=True) == 2304
    if HAS_GPU:
        assert _triton.sm_count() == jax.local_devices()[0].core_count
    else:
        assert _triton.sm_count() is None and _triton.choose_launch(2250) == _triton.LaunchConfig(128, 4)


def test_the_launch_shape_does_not_change_the_solution(x64, monkeypatch):
    # Interpret mode runs the 20 lanes as one tile of 32; forced to 16 lanes per program
    # (kernels/_triton.LAUNCH_OVERRIDE, as bench/gpu_check.py's launch rows) they run as 2 tiles,
    # lanes finishing far apart and a shared argument's cotangent summed over the tiles. Values,
    # step counts and gradients are the same.
    from fusedrk.kernels import _triton

    y0, rate = jnp.linspace(0.5, 1.5, 20), jnp.geomspace(0.5, 20.0, 20)
    tiles = []
    call = _triton.call

    def counting_call(*args, num_tiles, **kwargs):
        tiles.append(num_tiles)
        return call(*args, num_tiles=num_tiles, **kwargs)

    monkeypatch.setattr(_triton, "call", counting_call)

    def run(y0, rate, s):
        sol = fusedrk.solve(lambda t, y, a: _spread_field(t, y, a), y0, 0.0, 2.0, args=(rate, s),
                            args_axes=(0, None), dt0=0.05, rtol=1e-7, atol=1e-9, ts=jnp.asarray([0.3, 2.0]),
                            backend="pallas", interpret=True)
        return _loss(sol.ys), sol

    grad = jax.value_and_grad(run, argnums=(0, 1, 2), has_aux=True)
    (_, one), g_one = grad(y0, rate, jnp.asarray(0.3))
    monkeypatch.setattr(_triton, "LAUNCH_OVERRIDE", _triton.LaunchConfig(16, 1))
    (_, two), g_two = grad(y0, rate, jnp.asarray(0.3))
    assert tiles == [1, 1, 2, 2], tiles  # forward and reverse kernels, each launch
    steps = np.asarray(one.stats["num_steps"])
    assert steps.max() - steps.min() > 10, steps
    np.testing.assert_array_equal(two.stats["num_steps"], steps)
    np.testing.assert_array_equal(two.ys, one.ys)
    assert_tree_close(g_two, g_one, rtol=1e-13)
