"""Everything specific to the Pallas GPU lowering the kernels use: Triton, for now.

Owns: the compiler parameters, the ``pallas_call`` wrapper, how a ref lives in memory (whole
arrays in HBM, ``memory_space=pl.ANY``, addressed with ``pl.ds`` lane slices), and the lane-tile
heuristic. Pallas's Triton backend is deprecated from jax 0.11; a port to Mosaic GPU changes
this module and the kernels' loads and stores, nothing else.

Must not: contain step algebra or loops over steps.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# 128 lanes per program puts one lane per thread of a 4-warp program; fewer lanes than that
# leave threads idle, more serialise the in-kernel time loop over fewer programs. Small batches
# use the next power of two (at least 16, Triton's smallest comfortable block).
MAX_LANE_TILE = 128
MIN_LANE_TILE = 16


def choose_launch(batch: int) -> LaunchConfig:
    tile = MIN_LANE_TILE
    while tile < min(batch, MAX_LANE_TILE):
        tile *= 2
    return LaunchConfig(lane_tile=tile)


def lane_slice(config: LaunchConfig):
    """The slice of a [..., B] ref that belongs to this program's lane tile."""
    return pl.ds(pl.program_id(0) * config.lane_tile, config.lane_tile)


def program_index():
    return pl.program_id(0)


def call(kernel, inputs, out_shape, config: LaunchConfig, *, num_tiles: int, interpret: bool, name: str):
    """Launch ``kernel`` over ``num_tiles`` lane tiles; every ref lives whole in HBM."""
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        kernel,
        grid=(num_tiles,),
        in_specs=[hbm] * len(inputs),
        out_specs=[hbm] * len(out_shape),
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        name=name,
    )(*inputs)


def any_lane(mask: jax.Array) -> jax.Array:
    """Whether any lane of the tile is set (a reduction over the tile Triton lowers)."""
    return jnp.max(mask.astype(jnp.int32)) > 0
