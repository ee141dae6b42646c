"""Everything specific to the Pallas GPU lowering the kernels use: Triton, for now.

Owns: the compiler parameters, the ``pallas_call`` wrapper, how a ref lives in memory (whole
arrays in HBM, ``memory_space=pl.ANY``, addressed with ``pl.ds`` lane slices), and the lane-tile
heuristic. Pallas's Triton backend is deprecated from jax 0.11; a port to Mosaic GPU changes
this module and the kernels' loads and stores, nothing else.

It also owns lowering for a CUDA GPU on a machine without one (``gpu_lowering``): the Triton
module of every ``pallas_call`` is captured as it is built, so a test can run the Triton IR
verifier over it (lowering alone does not verify; XLA does, when it compiles on the GPU).

Must not: contain step algebra or loops over steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton


@dataclass(frozen=True)
class LaunchConfig:
    """Launch parameters of one kernel.

    lane_tile: lanes per program (a power of two; Triton needs power-of-two value sizes).
    num_warps, num_stages: Triton's; num_stages=1 because the loops are sequential in time.
    """

    lane_tile: int
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        if self.lane_tile < 1 or self.lane_tile & (self.lane_tile - 1):
            raise ValueError(f"{self.lane_tile=} must be a power of two")


# A program runs one lane per thread: ``lane_tile / 32`` warps (one warp under 32 lanes; 16
# lanes leave half of it idle), so each warp executes the same instructions per step whatever
# the tile. Each step is a chain of dependent operations (latency, not issue rate, bounds a
# warp), so a program's time per step does not shrink with fewer lanes; what the tile decides
# is how many SMs hold programs, and with them the issue slots, load/store units and memory
# bandwidth a step's tape rows share. So the largest tile (at most 128 lanes: four warps, one
# per scheduler of an SM) whose programs still cover every SM, and the smallest (16, Triton's
# smallest comfortable block) when B is too small for that: the seed's 2,250 lanes on an H100's
# 132 SMs make 141 programs of 16 lanes instead of 18 of 128, leaving no SM idle. Batches of
# more than 128 x (SMs - 1) lanes (16,768 on an H100) keep 128 lanes and 4 warps. Deviceless H100
# compile (jax 0.11.2, 2026-12-07): registers per thread and the step loop's PTX do not grow at
# the smaller tiles (bench/README.md, "Launch shape"); the time per shape is what
# bench/gpu_check.py's ``compare launch`` rows measure on a GPU. In interpret mode (on any
# machine) and without a GPU the SM count plays no part and the tile is the next power of two
# of B up to 128: interpret mode runs programs one after another, so fewer is faster.
#
# A field with block values (``_grid.Block``: weight matrices) takes the smallest tile and 8
# warps: its block products ([lanes, *weight shape]) then spread over 256 threads instead of each
# thread holding much of a lane's products. The catalogue MLP (4 -> 32 -> 4, float32, B = 65,536;
# deviceless H100 compile, 2026-11-29), registers and spill stores, forward / reverse kernel:
#   128 lanes, 4 warps: 255 regs 764 B / 255 regs 40,028 B
#    16 lanes, 4 warps: 168 regs 0 B   / 255 regs 7,124 B
#    16 lanes, 8 warps: 126 regs 0 B   / 255 regs 1,040 B
MAX_LANE_TILE = 128
MIN_LANE_TILE = 16
WARP = 32
BLOCK_WARPS = 8


# For measurement only: a launch every kernel of a field without block values takes instead
# of choose_launch's (bench/gpu_check.py's launch sweep sets it around one solve). None in
# normal use.
LAUNCH_OVERRIDE: Optional[LaunchConfig] = None


def sm_count() -> Optional[int]:
    """Streaming multiprocessors of the GPU the kernels are built for: the abstract H100's
    inside ``gpu_lowering``, the first local device's on a GPU, None without one."""
    if _lowering_for_gpu:
        return _abstract_sm_count
    if jax.default_backend() == "gpu":
        return getattr(jax.local_devices()[0], "core_count", None) or ABSTRACT_GPU_SMS
    return None


def choose_launch(batch: int, blocks: bool = False, *, interpret: bool = False,
                  sms: Optional[int] = None) -> LaunchConfig:
    """Lanes per program and warps for a batch of ``batch`` lanes on ``sms`` SMs (None: the
    target's, ``sm_count()``; interpret mode: none); see the comment above for the rule and
    its measurements."""
    if LAUNCH_OVERRIDE is not None and not blocks:
        return LAUNCH_OVERRIDE
    if blocks:
        return LaunchConfig(lane_tile=MIN_LANE_TILE, num_warps=BLOCK_WARPS)
    if interpret:
        sms = None
    elif sms is None:
        sms = sm_count()
    tile = MIN_LANE_TILE
    while tile < min(batch, MAX_LANE_TILE):
        tile *= 2
    while sms is not None and tile > MIN_LANE_TILE and -(-batch // tile) < sms:
        tile //= 2
    return LaunchConfig(lane_tile=tile, num_warps=max(1, tile // WARP))


def padded_batch(batch: int, blocks: bool = False, *, interpret: bool = False) -> int:
    """Lanes the kernels store for a batch: whole tiles (padded lanes repeat the last one)."""
    tile = choose_launch(batch, blocks, interpret=interpret).lane_tile
    return -(-batch // tile) * tile


def lane_slice(config: LaunchConfig):
    """The slice of a [..., B] ref that belongs to this program's lane tile."""
    return pl.ds(pl.program_id(0) * config.lane_tile, config.lane_tile)


def program_index():
    return pl.program_id(0)


def call(kernel, inputs, out_shape, config: LaunchConfig, *, num_tiles: int, interpret: bool, name: str,
         aliases: Optional[dict] = None):
    """Launch ``kernel`` over ``num_tiles`` lane tiles; every ref lives whole in HBM.

    ``aliases`` maps input positions to output positions that share the input's buffer (the
    kernel then reads and writes it through the output ref)."""
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        kernel,
        grid=(num_tiles,),
        in_specs=[hbm] * len(inputs),
        out_specs=[hbm] * len(out_shape),
        out_shape=out_shape,
        interpret=interpret,
        input_output_aliases=aliases or {},
        compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        name=name,
    )(*inputs)


def count_if(condition: jax.Array, count: int) -> jax.Array:
    """``count`` where ``condition`` holds, else 0: an int32 loop bound.

    Typed on purpose: ``jnp.where(c, count, 0)`` with weak-typed Python ints lowers to a
    select whose result takes the predicate's i1 type, and XLA then refuses the module
    ("'scf.for' op failed to verify that all of {lowerBound, upperBound, step} have same type").
    """
    return jnp.where(condition, jnp.int32(count), jnp.int32(0))


def barrier(interpret: bool) -> None:
    """Make every global-memory write of this program visible to all its threads (a CTA
    barrier). A lane's row may be written by one thread and read by another when a tile's
    layout replicates lanes across threads. Interpret mode runs sequentially: nothing to do."""
    if not interpret:
        pl_triton.debug_barrier()


def store_lanes(ref, value: jax.Array, mask: Optional[jax.Array], interpret: bool) -> None:
    """``ref[...] = value`` for the lanes where ``mask`` is set (every lane when None): on a
    GPU a predicated store, which leaves the other lanes' memory as it was. Interpret mode
    writes there what it fills unwritten memory with instead (NaN, or the integer minimum), so
    a read of it shows as one of never-written memory: Pallas's own interpret rule for a masked
    store rewrites the whole buffer on every call, and a read-modify-write of the slice made
    XLA copy the ring on every store (adaptive Lorenz, 1,024 lanes, 55 steps, max_steps 4,096:
    130 s against 0.3 s per gradient on this project's CPU)."""
    if mask is None:
        ref[...] = value
    elif interpret:
        dtype = jnp.dtype(value.dtype)
        poison = jnp.nan if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype).min
        ref[...] = jnp.where(mask, value, jnp.asarray(poison, dtype))
    else:
        pl_triton.store(ref, value, mask=mask)


def load_lanes(ref, mask: Optional[jax.Array], other, interpret: bool) -> jax.Array:
    """``ref[...]`` for the lanes where ``mask`` is set and ``other`` elsewhere (every lane
    when None): on a GPU a predicated load, which does not read the other lanes' memory."""
    if mask is None:
        return ref[...]
    if interpret:
        return jnp.where(mask, ref[...], other)
    return pl_triton.load(ref, mask=mask, other=other)


def any_lane(mask: jax.Array) -> jax.Array:
    """Whether any lane of the tile is set (a reduction over the tile Triton lowers)."""
    return jnp.max(mask.astype(jnp.int32)) > 0


# -------------------------------------------------------------- lowering without a GPU

# The abstract device a lowering without a GPU targets on jax >= 0.11 (jax 0.10 assumes
# compute capability 9.0 when it finds no GPU). Its name selects the Triton target.
ABSTRACT_GPU_KIND = "NVIDIA H100 80GB HBM3"
ABSTRACT_GPU_SMS = 132
_lowering_for_gpu = False
_abstract_sm_count = ABSTRACT_GPU_SMS


def lowering_for_gpu() -> bool:
    """True inside ``gpu_lowering``: solve(backend="pallas") may lower for CUDA without a GPU."""
    return _lowering_for_gpu


@contextlib.contextmanager
def gpu_lowering(mesh=None) -> Iterator[list]:
    """Lower for a CUDA GPU on any machine, capturing each Triton module as it is built.

    Use with ``jax.jit(fn).trace(...).lower(lowering_platforms=("cuda",))``; the yielded list
    receives the MLIR operation of every ``pallas_call`` lowered inside the block. Pass the
    problem's concrete times (Python floats, NumPy arrays): a traced check adds a host
    callback, which cannot lower for another platform. ``mesh``: an abstract mesh to lower
    under (a deviceless compile passes its topology's); by default one abstract H100.
    """
    global _lowering_for_gpu, _abstract_sm_count
    from jax._src.pallas.triton import lowering as triton_lowering

    captured: list = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def capturing(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.module.operation)
        return result

    with contextlib.ExitStack() as stack:
        if mesh is None and hasattr(jax.sharding, "AbstractDevice"):  # jax >= 0.11 needs a target
            device = jax.sharding.AbstractDevice(device_kind=ABSTRACT_GPU_KIND, num_cores=ABSTRACT_GPU_SMS,
                                                 platform="gpu")
            mesh = jax.sharding.AbstractMesh((1,), ("lanes",), abstract_device=device)
        if mesh is not None:
            stack.enter_context(jax.sharding.use_abstract_mesh(mesh))
        cores = getattr(getattr(mesh, "abstract_device", None), "num_cores", None)
        triton_lowering.lower_jaxpr_to_triton_module = capturing
        previous = _lowering_for_gpu, _abstract_sm_count
        _lowering_for_gpu, _abstract_sm_count = True, cores or ABSTRACT_GPU_SMS
        try:
            yield captured
        finally:
            triton_lowering.lower_jaxpr_to_triton_module = original
            _lowering_for_gpu, _abstract_sm_count = previous


def verify_error(module) -> Optional[str]:
    """The Triton IR verifier's first error line for a captured module, or None if valid."""
    try:
        module.verify()
    except Exception as e:  # MLIR raises its own error type, which differs across versions
        lines = [line.strip() for line in str(e).splitlines() if "error" in line]
        return lines[0] if lines else str(e).strip()
    return None


def kernel_name(module) -> str:
    return module.attributes["sym_name"].value
