"""Pieces shared by our Hopper Mosaic GPU kernels (`grouped_matmul`, `attention_backward`):
shared-memory layouts, the register split of warp-specialised kernels, a ring of buffers'
last phases, a finished block's staging."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

MEMORY_REGISTERS, COMPUTE_REGISTERS = 40, 232  # a thread's registers: memory / compute warpgroups
# (what `plgpu.emit_pipeline_warp_specialized` gives each side with two compute warpgroups)


def swizzled(shape: tuple[int, ...], dtype, rows: int = 8) -> tuple:
    """Shared-memory transforms of a 16-bit [.., C] block: tiles of [rows, swizzle width], swizzled."""
    swizzle = plgpu.find_swizzle(shape[-1] * jnp.dtype(dtype).itemsize * 8)
    return plgpu.TilingTransform((rows, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def wait_last_phases(consumed, n_steps: jax.Array, stages: int) -> None:
    """A ring's producer waits for the releases of its last `stages` steps (of `n_steps`), which
    no load waited for: the buffers are free, and every phase of `consumed` observed, before
    the program ends."""
    for s in range(stages):
        last = n_steps - stages + s
        slot = jax.lax.rem(jnp.maximum(last, 0), stages)
        pl.when(last >= 0)(functools.partial(plgpu.barrier_wait, consumed.at[slot]))


def stage_tile(block: jax.Array, out_smem) -> None:
    """A compute warpgroup's finished block (its accumulator's value, or rows of it) into its
    shared-memory block, in that block's dtype, once the previous copies out of it have read it."""
    out = block.astype(out_smem.dtype)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    out_smem[...] = out
    plgpu.commit_smem()
