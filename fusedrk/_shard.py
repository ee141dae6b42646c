"""Several devices: the batch axis split over a ``jax.sharding`` mesh, one core per device.

Owns: reading how the batch axis of ``y0`` is sharded, padding the batch to a whole number of
lanes per device, and running the differentiable core of ``_solve.py`` once per device with
``jax.shard_map``. Lanes never interact inside a solve (each has its own times, steps and
result), so a device's lanes need nothing from other devices inside the time loop: the only
communication is the sum over devices of shared arguments' cotangents, which ``shard_map``'s
transpose adds for inputs it replicated.

Must not: know about steps, tapes or backends; touch the user's pytrees (``_solve.py`` hands
flat tuples of [B, ...] leaves).

With ``throw=True`` the result codes are checked per device (a runtime callback on each
device's own outputs), which adds no communication.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec


class BatchSharding(NamedTuple):
    """The mesh axes that split the batch axis, and how many devices that makes."""

    mesh: Any  # jax.sharding.Mesh (concrete arrays) or AbstractMesh (under jax.jit)
    axes: tuple  # mesh axis names partitioning axis 0
    devices: int


def batch_sharding(leaf, sharding=None) -> Optional[BatchSharding]:
    """How axis 0 of ``leaf`` (the first state leaf) is split over devices; None if it is not.

    ``sharding`` (a NamedSharding partitioning axis 0) overrides what the leaf says. A
    concrete array says it through ``.sharding``; under ``jax.jit`` a traced one says it only
    through its type, which holds the mesh when its axes are Explicit (``jax.make_mesh``'s
    default); with Auto axes a traced leaf looks unsharded and ``sharding`` must be given.
    """
    if sharding is None:
        if isinstance(leaf, jax.core.Tracer):
            sharding = getattr(jax.typeof(leaf), "sharding", None)
        else:
            sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding) or len(sharding.spec) == 0 or sharding.spec[0] is None:
        return None
    first = sharding.spec[0]
    axes = tuple(first) if isinstance(first, (tuple, list)) else (first,)
    # Kept for a single device too: on a mesh with Explicit axes the lanes carry the mesh axis
    # in their type, which the unsharded core's vmaps reject.
    return BatchSharding(sharding.mesh, axes, math.prod(sharding.mesh.shape[a] for a in axes))


def check_sharding_argument(sharding) -> None:
    if sharding is None:
        return
    if not isinstance(sharding, NamedSharding):
        raise TypeError(f"sharding must be a jax.sharding.NamedSharding (or None), got {sharding!r}")
    if len(sharding.spec) == 0 or sharding.spec[0] is None:
        raise ValueError(f"sharding must partition axis 0, the batch axis; got spec {sharding.spec}")


def repeat_last_lane(x, lanes: int):
    """x ([B, ...]) with its last lane repeated up to ``lanes`` lanes: padding lanes solve a
    real problem, so no NaN reaches a shared reduction, and their outputs are dropped (the
    kernels pad to whole tiles the same way)."""
    extra = lanes - x.shape[0]
    return x if extra <= 0 else jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])


def sharded(core: Callable, where: BatchSharding, B: int, *, per_lane: tuple,
            check: Optional[Callable] = None) -> Callable:
    """``core`` run once per device on its share of the lanes.

    ``core(*operands)`` takes operands whose leaves are per lane (leading axis B) or shared
    (the flags in ``per_lane``, one per operand: a bool, or a sequence of bools for a list
    operand) and returns a tuple of outputs whose leaves all lead with B. The returned function
    has the same signature; it pads B to a multiple of the device count, and its outputs are
    sharded like the input lanes and cut back to B. ``check(outputs)``, if given, runs on each
    device's outputs inside the per-device body (a runtime check that must not gather them).
    """
    lanes = -(-B // where.devices) * where.devices
    lane_spec = PartitionSpec(where.axes)

    def specs(flags):
        if isinstance(flags, bool):
            return lane_spec if flags else PartitionSpec()
        return [lane_spec if f else PartitionSpec() for f in flags]

    def padded(operand, flags):
        if isinstance(flags, bool):
            return jax.tree_util.tree_map(lambda x: repeat_last_lane(x, lanes), operand) if flags else operand
        return [repeat_last_lane(x, lanes) if f else x for x, f in zip(operand, flags)]

    explicit = any(t == jax.sharding.AxisType.Explicit for t in getattr(where.mesh, "axis_types", ()))

    def placed(operand, spec):
        # On a mesh with Explicit axes, shard_map takes only operands already laid out as its
        # in_specs say (per-lane args may arrive unsharded, padding moves lanes).
        if not explicit:
            return operand
        put = lambda x, s: jax.reshard(x, NamedSharding(where.mesh, s))  # noqa: E731
        if isinstance(spec, PartitionSpec):
            return jax.tree_util.tree_map(lambda x: put(x, spec), operand)
        return [put(x, s) for x, s in zip(operand, spec)]

    def call(*operands):
        in_specs = tuple(specs(f) for f in per_lane)
        operands = tuple(placed(padded(o, f), s) for o, f, s in zip(operands, per_lane, in_specs))
        # check_vma=False: the core's loops mix per-device values with constants in ways the
        # replication checker rejects (a cond branch of zeros, say); the transpose still sums
        # the cotangents of replicated inputs over the devices.
        # Under jax.jit: called eagerly, shard_map would run the core one operation at a time
        # on every device (measured ~10x slower than compiling it).
        body = core if check is None else lambda *ops: check(core(*ops))
        run = jax.jit(jax.shard_map(body, mesh=where.mesh, in_specs=in_specs,
                                    out_specs=lane_spec, check_vma=False))
        out = run(*operands)
        if lanes == B:
            return out
        if explicit:  # an Explicit mesh cannot hold B lanes split unevenly: replicate them
            out = jax.tree_util.tree_map(lambda x: jax.reshard(x, NamedSharding(where.mesh, PartitionSpec())), out)
        return jax.tree_util.tree_map(lambda x: x[:B], out)

    return call
