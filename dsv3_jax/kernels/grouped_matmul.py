"""Grouped matmul for dropless MoE: rows sorted by expert, one weight matrix per group.

Three implementations of the same product:
- "tokamax": the GPU kernels (GPU default when tokamax is installed; XLA's GPU ragged_dot
  expands to dense and is ~60x slower there, PERF.md). On Hopper our Mosaic GPU kernels for the
  product, its input gradient (which reads the weight transposed in place) and, where K >= 512,
  its weight gradient; elsewhere tokamax's grouped-matmul kernel and our Pallas (Triton) kernel
  for the weight gradient.
- "ragged": `jax.lax.ragged_dot`, XLA's own op (fused kernels on TPU; the TPU default).
- "tiled": rows cut into fixed tiles; each (tile, expert) pair that overlaps becomes one work
  item, so there are at most tiles + E - 1 items of dense [tile, K] x [K, N] matmuls, rows
  outside the item's expert masked to zero. Exact (every row is produced by exactly one item),
  about (1 + E * tile / M) times the useful FLOPs. XLA's CPU ragged_dot expands to a dense
  all-experts product (measured ~70x slower than a batched matmul at the small preset shape),
  so this is the CPU default.

Routed-expert rows come in one of two layouts (`LAYOUTS`, chosen like a kernel):
- "grouped": every row grouped by expert, through `grouped_matmul`;
- "blocks": each expert's first C rows as one zero-padded block of a dense batched matmul
  (`block_matmul`), only the rows past C through `grouped_matmul`. Dropless and exact;
  C = BLOCK_FACTOR x the balanced share. On the H200 the batched matmuls ran at ~470-690
  TFLOP/s against ~316 for tokamax's grouped one with its own tiles (~520-640 with
  `HOPPER_TILES`), but the overflow rows keep a grouped pass and their buffer is sized for any
  routing (M - C rows). Bench step, random-init routing (MaxVio 0.5-1.2): 2% faster, +16.6 GiB
  (docs/benchmarks.md, before `HOPPER_TILES`), so an option, not the default.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as plt

from dsv3_jax.kernels.choice import forced
from dsv3_jax.kernels.hopper import COMPUTE_REGISTERS, MEMORY_REGISTERS, stage_tile, swizzled, wait_last_phases
from dsv3_jax.kernels.vma import as_varying, cotangent_like, struct_like, vary_like, varying

IMPLS = ("tokamax", "ragged", "tiled")
LAYOUTS = ("grouped", "blocks")
BLOCK_FACTOR = 1.0  # "blocks": rows per expert block, x the balanced share (rows / experts)


def default_impl() -> str:
    """The impl `kernels.use` forces, else by backend (module docstring)."""
    if forced("grouped_matmul"):
        return forced("grouped_matmul")
    backend = jax.default_backend()
    if backend == "gpu" and importlib.util.find_spec("tokamax") is not None:
        return "tokamax"
    return "tiled" if backend == "cpu" else "ragged"


def default_layout() -> str:
    """The layout `kernels.use` forces, else "grouped" (every backend; module docstring)."""
    return forced("expert_layout") or "grouped"


def block_rows(rows: int, n_experts: int, layout: str) -> int:
    """Rows per expert block for `rows` (token, expert) assignments: BLOCK_FACTOR x rows /
    n_experts rounded up to a multiple of 8 under "blocks", 0 (no blocks) under "grouped"."""
    if layout not in LAYOUTS:
        raise ValueError(f"expert layout {layout!r}: choose from {LAYOUTS}")
    if layout == "grouped" or rows == 0:
        return 0
    return -(-math.ceil(BLOCK_FACTOR * rows / n_experts) // 8) * 8


def block_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [E, C, K] (block e for expert e), w [E, K, N] -> [E, C, N]: one batched matmul,
    accumulated in fp32 and rounded once to x's dtype."""
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return _batched(x, w.astype(x.dtype), precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _batched(x, w, precision):
    """A custom gradient for the reason `_ragged` has one: both backward products on x's dtype."""
    return jnp.einsum("eck,ekn->ecn", x, w, precision=precision, preferred_element_type=jnp.float32).astype(x.dtype)


def _batched_fwd(x, w, precision):
    return _batched(x, w, precision), (x, w)


def _batched_bwd(precision, res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = jnp.einsum("ecn,ekn->eck", g, w, precision=precision, preferred_element_type=jnp.float32)
    dw = jnp.einsum("eck,ecn->ekn", x, g, precision=precision, preferred_element_type=jnp.float32)
    return cotangent_like(dx, x).astype(x.dtype), cotangent_like(dw, w).astype(w.dtype)  # summed where w is shared


_batched.defvjp(_batched_fwd, _batched_bwd)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, impl: str | None = None,
                   tile: int = 128) -> jax.Array:
    """x [M, K] (rows grouped by expert, in expert order), w [E, K, N], group_sizes [E] -> [M, N].

    Rows past sum(group_sizes) come out as zeros. Accumulates in fp32, returns x's dtype.
    """
    impl = impl or default_impl()
    if impl not in IMPLS:
        raise ValueError(f"grouped matmul impl {impl!r}: choose from {IMPLS}")
    w = w.astype(x.dtype)
    if x.shape[0] == 0:  # no rows (an empty batch): nothing to tile or launch
        return jnp.zeros((0, w.shape[2]), x.dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    if impl == "tokamax":
        out = _tokamax(x, w, group_sizes, precision)  # accumulates in fp32 inside the kernel
    elif impl == "ragged":
        out = _ragged(x, w, group_sizes, precision)
    else:
        out = _tiled(x, w, group_sizes, min(tile, x.shape[0]), precision)
    return out.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ragged(x, w, group_sizes, precision):
    """`jax.lax.ragged_dot` with fp32 accumulation, rounded once to x's dtype. A custom gradient
    (as for the einsum wrapper, model/layers.py): autodiff would differentiate through the fp32
    accumulator and run both backward products on fp32 operands (multi-pass on TPU/GPU)."""
    return jax.lax.ragged_dot(x, w, group_sizes, precision=precision, preferred_element_type=jnp.float32
                              ).astype(x.dtype)


def _ragged_fwd(x, w, group_sizes, precision):
    return _ragged(x, w, group_sizes, precision), (x, w, group_sizes)


def _ragged_bwd(precision, res, g):
    """dx = g w_e^T per group (ragged rows); dW[e] = x_e^T g_e (ragged contraction): x's dtype
    operands, fp32 accumulation, one rounding to the primal's dtype."""
    x, w, group_sizes = res
    g = g.astype(x.dtype)
    dx = jax.lax.ragged_dot(g, w.transpose(0, 2, 1), group_sizes, precision=precision,
                            preferred_element_type=jnp.float32).astype(x.dtype)
    by_group = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                                 lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    dw = jax.lax.ragged_dot_general(x, g, group_sizes, by_group, precision=precision,
                                    preferred_element_type=jnp.float32)  # [M,K] x [M,N] -> [E,K,N]
    return cotangent_like(dx, x), cotangent_like(dw, w).astype(w.dtype), None


_ragged.defvjp(_ragged_fwd, _ragged_bwd)


def _group_bounds(group_sizes: jax.Array, align: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each group's first row [E], one past its last [E] (groups contiguous from row 0), and its
    first row rounded down to `align` [E], where a kernel's row blocks for it start."""
    sizes = jnp.maximum(group_sizes, 0).astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    return starts, ends, starts // align * align


def row_tasks(group_sizes: jax.Array, block_m: int, n_tasks: int, align: int = 8):
    """The row blocks of a grouped product, one task each: group [T], first row [T] (a multiple
    of `align`), offset of the group's first row in the block [T] and its row count there [T]
    (0: nothing to do). A group's blocks start at its first row rounded down to `align`, so a
    block shared by two groups is computed once for each; cdiv(M, block_m) + E - 1 tasks
    cover any grouping of M rows."""
    E = group_sizes.shape[0]
    starts, ends, first = _group_bounds(group_sizes, align)
    blocks = jnp.where(ends > starts, (ends - first + block_m - 1) // block_m, 0)
    last_task = jnp.cumsum(blocks)  # one past each group's last task
    t = jnp.arange(n_tasks, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(last_task, t, side="right", method="compare_all"), E - 1).astype(jnp.int32)
    row0 = first[group] + (t - (last_task - blocks)[group]) * block_m
    lo, hi = jnp.maximum(row0, starts[group]), jnp.minimum(row0 + block_m, ends[group])
    return group, row0, lo - row0, jnp.maximum(hi - lo, 0)


def _work_items(group_sizes, M: int, E: int, tile: int):
    """The (tile, expert) pairs that overlap (`row_tasks` with blocks on tile boundaries): expert
    [W], tile index [W], row ids [W, tile] and which of those rows belong to the item's expert
    [W, tile]; W = tiles + E - 1 (items with no rows point at the last tile)."""
    n_tiles = -(-M // tile)
    group, row0, offset, n_rows = row_tasks(group_sizes, tile, n_tiles + E - 1, align=tile)
    tile_of = jnp.minimum(row0 // tile, n_tiles - 1)  # [W]
    local = jnp.arange(tile)[None, :]
    keep = (local >= offset[:, None]) & (local < (offset + n_rows)[:, None])  # [W, tile]
    return group, tile_of, tile_of[:, None] * tile + local, keep


def _tiles(a, tile_of, keep, tile):
    """Rows of a [M, C] gathered per work item, foreign rows zeroed: [W, tile, C]."""
    M, C = a.shape
    padded = jnp.pad(a, ((0, -(-M // tile) * tile - M), (0, 0))).reshape(-1, tile, C)
    return padded[tile_of] * keep[..., None].astype(a.dtype)


def _tiled(x, w, group_sizes, tile, precision):
    M, E, N = x.shape[0], w.shape[0], w.shape[2]
    group, tile_of, rows, keep = _work_items(group_sizes, M, E, tile)
    ys = jnp.einsum("wtk,wkn->wtn", _tiles(x, tile_of, keep, tile), w[group], precision=precision,
                    preferred_element_type=jnp.float32)  # [W, tile, N]
    out = jnp.zeros((-(-M // tile) * tile, N), jnp.float32).at[rows.reshape(-1)].add(ys.reshape(-1, N))
    return out[:M]


def _tiled_weight_grad(x, g, group_sizes, E: int, tile: int, precision):
    """dW[e] = x_e^T g_e for rows grouped by expert: x [M, K], g [M, N] -> [E, K, N] in fp32."""
    group, tile_of, _, keep = _work_items(group_sizes, x.shape[0], E, tile)
    dw = jnp.einsum("wtk,wtn->wkn", _tiles(x, tile_of, keep, tile), _tiles(g, tile_of, keep, tile),
                    precision=precision, preferred_element_type=jnp.float32)  # [W, K, N]
    return jnp.zeros((E,) + dw.shape[1:], jnp.float32).at[group].add(dw)


def _pallas_weight_grad(x, g, group_sizes, E: int, precision, dtype=jnp.float32, interpret: bool = False):
    """dW[e] = x_e^T g_e as one Pallas (Triton) kernel: x [M, K], g [M, N] -> [E, K, N] in
    `dtype`, accumulated in fp32 (the weight's dtype: no separate fp32 copy to round).

    Program (j, i, e) owns the [bk, bn] block (i, j) of expert e's gradient (`_wg_tiles`) and
    walks that expert's rows in blocks of bm (rows past the group masked to zero), so nothing
    but the result is written and rows outside every group (the padding) cost nothing. The
    expert is the grid's slowest axis: the programs running together share one expert's rows,
    which stay in L2 (on an H200 at the bench shape 0.56-0.60 ms a projection against 0.82-0.90
    with the expert fastest; the tiled form took ~3.6). K and N must be multiples of 128
    (`_weight_grad` falls back).
    """
    M, K = x.shape
    N = g.shape[1]
    (bm, bk, bn), stages = _wg_tiles(K, N)
    ends = jnp.cumsum(group_sizes)
    axes = varying(x) | varying(g) | varying(ends)  # inside shard_map: every operand typed alike
    x, g, ends = (as_varying(a, axes) for a in (x, g, ends))
    starts = ends - group_sizes

    def kernel(starts_ref, ends_ref, x_ref, g_ref, out_ref):
        j, i, e = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        start, end = starts_ref[e], ends_ref[e]

        def step(r, acc):  # acc [bk, bn] += x[rows, i-block]^T g[rows, j-block]
            row0 = start + r * bm
            valid = (row0 + jnp.arange(bm) < end)[:, None]
            xb = plt.load(x_ref.at[pl.ds(row0, bm), pl.ds(i * bk, bk)], mask=valid, other=0)
            gb = plt.load(g_ref.at[pl.ds(row0, bm), pl.ds(j * bn, bn)], mask=valid, other=0)
            return acc + plt.dot(xb, gb, trans_a=True, precision=precision)

        acc = jax.lax.fori_loop(0, (end - start + bm - 1) // bm, step, jnp.zeros((bk, bn), jnp.float32))
        out_ref[...] = acc.astype(out_ref.dtype)

    return pl.pallas_call(
        kernel, out_shape=struct_like((E, K, N), dtype, x), grid=(N // bn, K // bk, E),
        out_specs=pl.BlockSpec((None, bk, bn), lambda j, i, e: (e, i, j)), interpret=interpret,
        compiler_params=None if interpret else plt.CompilerParams(num_warps=8, num_stages=stages),
    )(starts, ends, x, g)


def _wg_tiles(K: int, N: int) -> tuple[tuple[int, int, int], int]:
    """The weight-gradient kernel's (rows per step, K block, N block) and pipeline stages:
    [128, 256] gradient blocks over 4 stages where 256 divides N, else [128, 128] over 3; 32 rows
    a step where K >= 2048. On the H200 at the bench shape, 8 warps, K 2048 -> N 1024 (gate and
    up): 32 rows 0.91 ms against 1.11 with 64 in one sweep, level in a repeat (0.99-1.02 against
    0.97-1.01); the bench step was measured with 32. 512 -> 2048 (down): 0.56-0.62 ms with 64
    rows, 0.58-0.59 with 32 (docs/benchmarks.md)."""
    if N % 256:
        return (64, 128, 128), 3
    return (32 if K >= 2048 else 64, 128, 256), 4


def _weight_grad(x, g, group_sizes, E: int, precision, dtype):
    """The grouped weight gradient in `dtype`: `_hopper_weight_grad` where it applies, else the
    Pallas kernel where its blocks tile [K, N], else tiled."""
    if _hopper_wgrad_fits(x.shape[1], g.shape[1], x.dtype, dtype):
        return vary_like(_hopper_weight_grad(x, g, group_sizes, E, dtype), x, g, group_sizes)
    if x.shape[1] % 128 or g.shape[1] % 128:
        return _tiled_weight_grad(x, g, group_sizes, E, 128, precision).astype(dtype)
    return _pallas_weight_grad(x, g, group_sizes, E, precision, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tokamax(x, w, group_sizes, precision):
    """The product and input gradient by `_hopper_grouped_matmul` where it applies (`_hopper_fits`),
    else tokamax's kernel; the weight gradient is ours (`_weight_grad`): tokamax's measured wrong
    on the H200 (tokamax 0.0.17: 55% max error vs the portable path)."""
    if _hopper_fits(x.shape[1], w.shape[2], x.dtype):
        return vary_like(_hopper_grouped_matmul(x, w, group_sizes, transposed=False), x, w, group_sizes)
    import tokamax

    out = tokamax.ragged_dot(x, w, group_sizes, precision=precision, preferred_element_type=x.dtype,
                             implementation=_tokamax_kernel(x.shape[1], w.shape[2]))
    return vary_like(out, x, w, group_sizes)


HOPPER_TILES = dict(block_m=128, block_n=128, block_k=64, num_stages=3, grid_tile_width=8)
"""tokamax grouped-matmul tiles on Hopper: [128, 128] outputs, K in steps of 64 over 3 stages, the
grid walked along N in strips of 8 tiles (16 where N >= 2048: `_tokamax_kernel`). On the H200 at
the bench shape (131,072 rows, 64 experts) 0.43 ms for K 2048 -> N 512 and 0.53 ms for 512 ->
2048 (640 / 520 TFLOP/s), against 0.85 ms for both with tokamax's own choice ([64, 64] tiles,
2 stages); same results to the bit. At 98,304 rows, K 1024 -> N 2048 (gate and up's input
gradient) took 0.96 ms in strips of 16 against 1.18 in strips of 8."""


def _hopper() -> bool:
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def _tokamax_kernel(K: int, N: int):
    """tokamax's Mosaic GPU kernel with `HOPPER_TILES` on a Hopper GPU where they divide [K, N];
    None (tokamax picks its kernel and tiles) elsewhere."""
    if not _hopper() or K % 64 or N % 128:
        return None
    # tokamax.ops.gpu exports the same classes but also imports jax_triton, which we do not need
    from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu as mosaic
    from tokamax._src.ops.ragged_dot.pallas_mosaic_gpu_common import MatmulDimension

    tiles = dict(HOPPER_TILES, grid_tile_width=16 if N >= 2048 else HOPPER_TILES["grid_tile_width"])
    config = mosaic.Config(split_k=1, persistent=False, grid_minor_dim=MatmulDimension.N, **tiles)
    return [mosaic.PallasMosaicGpuRaggedDot(config=config)]


def _tokamax_fwd(x, w, group_sizes, precision):
    return _tokamax(x, w, group_sizes, precision), (x, w, group_sizes)


def _tokamax_bwd(precision, res, g):
    x, w, group_sizes = res
    g_in = g.astype(x.dtype)
    if _hopper_fits(w.shape[2], w.shape[1], x.dtype):  # w [E,K,N] read as [E,N,K]: no transposed copy
        dx = vary_like(_hopper_grouped_matmul(g_in, w, group_sizes, transposed=True), g, w, group_sizes)
    else:
        dx = _tokamax(g_in, w.transpose(0, 2, 1), group_sizes, precision)
    dw = _weight_grad(x, g_in, group_sizes, w.shape[0], precision, w.dtype)
    return cotangent_like(dx, x), cotangent_like(dw, w), None


_tokamax.defvjp(_tokamax_fwd, _tokamax_bwd)


HOPPER_GROUPED_TILES = dict(block_m=128, block_n=128, block_k=64, num_stages=4, strip=8, epilogue_rows=64)
"""`_hopper_grouped_matmul`'s tiles: each of two compute warpgroups owns a [128, 128] output
block of a [128, 256] tile; K in steps of 64 through 4 shared-memory stages (fewer where they do
not divide the steps: `_hopper_grouped_matmul`); the finished block staged out 64 rows at a time
(4 stages and 128 staged rows would not fit in shared memory); tiles walked along N in strips
of 8. On the H200 at the bench shape (98,304 rows, gamma(4) skewed over 64 experts; ms, two runs
each, against 3 stages, whole-block staging and a pipeline drained at every tile): K 2048 -> N
1024 (gate and up) 0.613 / 0.628 against 0.613 / 0.607; its input gradient 1024 -> 2048 0.637 /
0.645 against 0.656 / 0.650; 512 -> 2048 (down) 0.365 / 0.358 against 0.397 / 0.402; its input
gradient 2048 -> 512 0.322 / 0.331 against 0.334 / 0.331 (in the bench step: 21.8 ms a step
against 23.2). Chained with 2 stages: 0.69, 0.71, 0.40, 0.39. Earlier, unchained: 2 stages 8-15%
slower than 3; one warpgroup a tile (no warp specialisation) 4-7% slower; tokamax with
`HOPPER_TILES` on a transposed weight copy 0.659, 0.832, 0.404, 0.349; [128, 256] accumulators
for one warpgroup do not lower (docs/benchmarks.md). Fortieth session (in flight, min of eight
rounds): whole [128, 128] tiles a warpgroup, alternating, each warpgroup fed by its own ring of
three stages, 0.775, 0.819, 0.436, 0.450 against 0.609, 0.642, 0.377, 0.348 (a lone
warpgroup's products wait on its loads); leaving the stores out saves 5-10%. Forty-first session
(same method, min ms, every output bitwise equal): a tile's finished block kept in registers and
stored under the next tile's first products (one ring, 4 stages) 0.663, 0.749, 0.395, 0.404
against 0.618, 0.679, 0.377, 0.386; the warpgroups splitting the tile's rows instead ([64, 256]
each, one n256 product a K16 step, a warpgroup without rows of the task's group skipping its
products) 0.623, 0.690, 0.415, 0.381 against 0.612, 0.693, 0.422, 0.380: level."""


def _sm_count() -> int:
    """Streaming multiprocessors of the GPU: one persistent program each."""
    return jax.devices()[0].core_count


def _hopper_fits(K: int, N: int, dtype) -> bool:
    """Whether `_hopper_grouped_matmul` runs a [K] -> [N] product here: a Hopper GPU, 16-bit
    operands, K a multiple of the K step and N of the 256-wide tile."""
    t = HOPPER_GROUPED_TILES
    return (_hopper() and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and not K % t["block_k"] and not N % (2 * t["block_n"]))


def _persistent_call(kernel, out_type: jax.ShapeDtypeStruct, name: str):
    """`kernel` as one program per SM (axis "sm"), each a memory and two compute warpgroups ("wg")."""
    return plgpu.kernel(kernel, out_type=out_type, grid=(_sm_count(),), grid_names=("sm",), num_threads=3,
                        thread_name="wg", kernel_name=name, compiler_params=plgpu.CompilerParams(approx_math=True))


def _hopper_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, transposed: bool) -> jax.Array:
    """x [M, K] (rows grouped by expert) times each group's w[e] [K, N], or w[e]^T for w [E, N, K]
    when `transposed` -> [M, N] in x's dtype, accumulated in fp32. Rows outside every group are
    not written.

    The transposed form is the routed experts' input gradient read from the forward's own weight
    layout: with a transposed copy XLA built both layouts of gate and up in three passes (5.1 ms
    a bench step on the H200) and transposed down too; now one pass casts gate and up (2.1 ms)
    and down is only cast.

    Mosaic GPU (Hopper wgmma), persistent and warp-specialised: one program per SM walks the
    [128, 256] output tiles of the row tasks (`row_tasks`); a memory warpgroup streams [128, bk]
    row blocks and [bk, 256] weight blocks ([256, bk] when transposed, fed to wgmma transposed)
    through shared memory by TMA while two compute warpgroups each accumulate one [128, 128]
    half. A program's tiles run as one chain of pipelines (`plgpu.PipelinePipeline`): the memory
    warpgroup loads the next tile's first blocks while the compute warpgroups finish a tile, and
    a tile's rows go out as copies of power-of-two row counts (static shapes) while the next
    tile's products run. Chaining needs the K steps in whole rounds of the stages, so the stage
    count is the largest divisor of K / bk up to `num_stages`."""
    M, K = x.shape
    E = w.shape[0]
    N = w.shape[1] if transposed else w.shape[2]
    t = HOPPER_GROUPED_TILES
    bm, bn, bk, epi = t["block_m"], t["block_n"], t["block_k"], t["epilogue_rows"]
    m_tasks, n_tiles = -(-M // bm) + E - 1, N // (2 * bn)
    w_block = (2 * bn, bk) if transposed else (bk, 2 * bn)
    stages = max(d for d in range(1, t["num_stages"] + 1) if (K // bk) % d == 0)

    def kernel(x_gmem, w_gmem, group_gmem, row0_gmem, offset_gmem, rows_gmem, out_gmem):
        def pipeline(step, context, state=None):  # `state` chains a program's pipelines
            return plgpu.emit_pipeline_warp_specialized(
                step, grid=(K // bk,), memory_registers=MEMORY_REGISTERS, wg_axis="wg", num_compute_wgs=2,
                max_concurrent_steps=stages, compute_context=context, pipeline_state=state, in_specs=[
                    plgpu.BlockSpec((bm, bk), lambda k: (0, k), transforms=swizzled((bm, bk), x.dtype)),
                    plgpu.BlockSpec(w_block, (lambda k: (0, k)) if transposed else (lambda k: (k, 0)),
                                    transforms=swizzled(w_block, w.dtype))])

        def weight_tile(e, ni):  # [2bn, K] or [K, 2bn] of expert e
            cols = pl.ds(ni * 2 * bn, 2 * bn)
            return w_gmem.at[e].at[cols] if transposed else w_gmem.at[e].at[:, cols]

        unused = lambda *_, **__: None

        @functools.partial(pl.run_scoped, collective_axes="wg",
                           allocations=pipeline(unused, unused).get_allocations(x_gmem.at[pl.ds(0, bm)],
                                                                                 weight_tile(0, 0)),
                           out_smem=plgpu.SMEM((2, epi, bn), x.dtype, transforms=swizzled((epi, bn), x.dtype, rows=1)))
        def _(allocations, out_smem):
            wg = jax.lax.axis_index("wg")

            @plgpu.nd_loop((m_tasks * n_tiles,), collective_axes="sm", init_carry=jnp.int32(0))
            def ran(loop, carry):  # carry: whether this program has run a tile yet
                mi, ni = plgpu.planar_snake(loop.index[0], (m_tasks, n_tiles), 1, t["strip"])
                e, offset, n_rows = group_gmem[mi], offset_gmem[mi], rows_gmem[mi]
                row0 = pl.multiple_of(row0_gmem[mi], 8)

                def step(_, x_smem, w_smem, acc):  # acc [bm, bn] += x block . this warpgroup's weight half
                    half = pl.ds(wg * bn, bn)
                    w_half = plgpu.transpose_ref(w_smem.at[half], (1, 0)) if transposed else w_smem.at[:, half]
                    plgpu.wgmma(acc, x_smem, w_half)
                    plgpu.wgmma_wait(0)
                    return acc

                def context(run):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((bm, bn)))
                    def _(acc):
                        run(acc)
                        out, col = acc[...], ni * 2 * bn + wg * bn
                        for c in range(bm // epi):  # the tile's rows [offset, offset + n_rows) by chunks
                            done = jnp.clip(offset - c * epi, 0, epi)
                            n = jnp.clip(offset + n_rows - c * epi, 0, epi) - done
                            stage_tile(out[c * epi:(c + 1) * epi], out_smem.at[wg])
                            for size in (epi >> i for i in range(epi.bit_length())):
                                @pl.when((n & size) != 0)
                                def _(done=done, size=size, first=row0 + c * epi):
                                    plgpu.copy_smem_to_gmem(
                                        out_smem.at[wg, pl.ds(done, size)],
                                        out_gmem.at[pl.ds(first + done, size), pl.ds(col, bn)],
                                        commit_group=False)
                                done = done + (n & size)
                            plgpu.commit_smem_to_gmem_group()

                @pl.when(n_rows > 0)
                def _():
                    state = jnp.where(carry == 0, plgpu.PipelinePipeline.START, plgpu.PipelinePipeline.STEADY)
                    pipeline(step, context, state)(x_gmem.at[pl.ds(row0, bm)], weight_tile(e, ni),
                                                   allocations=allocations)

                return carry | (n_rows > 0).astype(jnp.int32)

            @pl.when((wg == 2) & (ran > 0))
            def _():  # what a STOP pipeline would do (the last tile is not known ahead): the memory
                # warpgroup waits until the compute warpgroups have consumed the last buffers
                for slot in range(stages):
                    plgpu.barrier_wait(allocations["flat_consumed_barrier_refs"][0].at[slot])

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return _persistent_call(kernel, jax.ShapeDtypeStruct((M, N), x.dtype), "grouped_matmul_hopper")(
        x, w, *row_tasks(group_sizes, bm, m_tasks))


HOPPER_WEIGHT_GRAD_TILES = dict(block_m=64, block_k=128, block_n=128, num_stages=3, min_k=512)
"""`_hopper_weight_grad`'s tiles: each of two compute warpgroups owns a [128, 128] block of a
[128, 256] gradient tile; 64 rows a step through 3 shared-memory stages (4 and the staging
would not fit). On the H200 at the bench shape (98,304 rows, gamma(4) skewed over 64 experts;
ms): K 2048 -> N 1024 (gate and up) 0.637 / 0.634 against 0.652 / 0.643 with a pipeline drained
at every tile, 0.70 for the Pallas kernel at its best tiles; K 512 -> N 2048 (down) 0.356 /
0.365 against 0.369 / 0.372 drained and 0.376-0.378 for the Pallas kernel, so it runs where
K >= `min_k` (docs/benchmarks.md)."""


def _hopper_wgrad_fits(K: int, N: int, dtype, out_dtype) -> bool:
    """Whether `_hopper_weight_grad` runs x [M, K], g [M, N] here: a Hopper GPU, 16-bit operands
    and gradient (an fp32 tile's staging would not fit in shared memory beside 3 stages), K a
    multiple of the tile's 128 rows, at least `min_k`, and N of its 256 columns."""
    t = HOPPER_WEIGHT_GRAD_TILES
    sixteen_bit = {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)}
    return (_hopper() and {jnp.dtype(dtype), jnp.dtype(out_dtype)} <= sixteen_bit
            and K >= t["min_k"] and not K % t["block_k"] and not N % (2 * t["block_n"]))


def _hopper_weight_grad(x: jax.Array, g: jax.Array, group_sizes: jax.Array, E: int, dtype) -> jax.Array:
    """dW[e] = x_e^T g_e for rows grouped by expert: x [M, K], g [M, N] -> [E, K, N] in `dtype`,
    accumulated in fp32.

    Mosaic GPU (Hopper wgmma), persistent and warp-specialised: one program per SM walks the
    [128, 256] tiles of every expert's gradient, expert slowest (the programs in flight share
    that expert's rows in L2); a memory warpgroup streams 64-row blocks of x ([64, 128], fed to
    wgmma transposed) and g ([64, 256]) from the expert's first row rounded down to 8, while two
    compute warpgroups each accumulate one [128, 128] half. The blocks of all a program's tiles
    run through one ring of buffers, so the memory warpgroup loads the next tile's first blocks
    while the compute warpgroups finish and store a tile (an expert's block count is known only
    on the device, which `plgpu.emit_pipeline_warp_specialized` cannot chain).
    In a block that straddles the expert's rows both operands' foreign rows are set to zero in
    shared memory (selected, not multiplied: rows outside every group may hold anything); both
    warpgroups write the same x values. An expert without rows runs one such block, all of it
    zeroed, and writes a zero gradient.
    """
    M, K = x.shape
    N = g.shape[1]
    t = HOPPER_WEIGHT_GRAD_TILES
    bm, bk, bn = t["block_m"], t["block_k"], t["block_n"]
    k_tiles, n_tiles = K // bk, N // (2 * bn)
    starts, ends, first = _group_bounds(group_sizes, 8)
    blocks = jnp.maximum((ends - first + bm - 1) // bm, 1)

    stages, tiles_per_expert = t["num_stages"], k_tiles * n_tiles

    def kernel(x_gmem, g_gmem, starts_gmem, ends_gmem, first_gmem, blocks_gmem, out_gmem):
        def zero_rows_outside(ref, shape, lo, hi):  # ref [bm, C]: rows outside [lo, hi) set to 0
            row = plgpu.layout_cast(jax.lax.broadcasted_iota(jnp.int32, shape, 0), plgpu.Layout.WGMMA)
            ref[...] = jnp.where((row >= lo) & (row < hi), ref[...], 0).astype(ref.dtype)

        @functools.partial(pl.run_scoped, collective_axes="wg",
                           x_smem=plgpu.SMEM((stages, bm, bk), x.dtype, transforms=swizzled((bm, bk), x.dtype)),
                           g_smem=plgpu.SMEM((stages, bm, 2 * bn), g.dtype,
                                             transforms=swizzled((bm, 2 * bn), g.dtype)),
                           loaded=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                           consumed=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                           out_smem=plgpu.SMEM((2, bk, bn), dtype, transforms=swizzled((bk, bn), dtype, rows=1)))
        def _(x_smem, g_smem, loaded, consumed, out_smem):
            wg = jax.lax.axis_index("wg")

            def each_tile(body):
                """body(e, ki, ni, step) -> step over this program's tiles, expert slowest; `step`
                counts the row blocks run so far (its remainder by `stages` is the block's buffer)."""
                @plgpu.nd_loop((E * tiles_per_expert,), collective_axes="sm", init_carry=jnp.int32(0))
                def steps(loop, carry):  # carry: the blocks run so far
                    e, tile = jax.lax.div(loop.index[0], tiles_per_expert), jax.lax.rem(loop.index[0], tiles_per_expert)
                    return body(e, jax.lax.div(tile, n_tiles), jax.lax.rem(tile, n_tiles), carry)
                return steps

            @pl.when(wg == 2)
            def _():  # the memory warpgroup: a block's loads wait only for its buffer's previous block
                plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

                def load(e, ki, ni, step):
                    rows = pl.ds(pl.multiple_of(first_gmem[e], 8), M)  # from the expert's first row; its blocks only

                    def block(r, step):
                        slot = jax.lax.rem(step, stages)

                        @pl.when(step >= stages)
                        def _():
                            plgpu.barrier_wait(consumed.at[slot])

                        here = pl.ds(r * bm, bm)
                        plgpu.copy_gmem_to_smem(x_gmem.at[rows, pl.ds(ki * bk, bk)].at[here], x_smem.at[slot],
                                                loaded.at[slot])
                        plgpu.copy_gmem_to_smem(g_gmem.at[rows, pl.ds(ni * 2 * bn, 2 * bn)].at[here], g_smem.at[slot],
                                                loaded.at[slot])
                        return step + 1

                    return jax.lax.fori_loop(0, blocks_gmem[e], block, step)

                wait_last_phases(consumed, each_tile(load), stages)

            @pl.when(wg < 2)
            def _():  # the compute warpgroups: one [bk, bn] half of each tile's gradient
                plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")

                def accumulate(e, ki, ni, step):
                    row0 = pl.multiple_of(first_gmem[e], 8)
                    start, end = starts_gmem[e], ends_gmem[e]

                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((bk, bn)))
                    def step_after(acc):
                        def block(r, step):  # acc += x block^T . this warpgroup's g half
                            slot = jax.lax.rem(step, stages)
                            plgpu.barrier_wait(loaded.at[slot])
                            x_block, g_half = x_smem.at[slot], g_smem.at[slot, :, pl.ds(wg * bn, bn)]
                            lo, hi = start - (row0 + r * bm), end - (row0 + r * bm)  # the expert's rows here

                            @pl.when((lo > 0) | (hi < bm))
                            def _():
                                zero_rows_outside(x_block, (bm, bk), lo, hi)
                                zero_rows_outside(g_half, (bm, bn), lo, hi)
                                plgpu.commit_smem()

                            plgpu.wgmma(acc, plgpu.transpose_ref(x_block, (1, 0)), g_half)
                            plgpu.wgmma_wait(0)
                            plgpu.barrier_arrive(consumed.at[slot])
                            return step + 1

                        after = jax.lax.fori_loop(0, blocks_gmem[e], block, step)
                        stage_tile(acc[...], out_smem.at[wg])
                        plgpu.copy_smem_to_gmem(
                            out_smem.at[wg], out_gmem.at[e, pl.ds(ki * bk, bk), pl.ds(ni * 2 * bn + wg * bn, bn)])
                        return after

                    return step_after

                each_tile(accumulate)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return _persistent_call(kernel, jax.ShapeDtypeStruct((E, K, N), dtype), "grouped_weight_grad_hopper")(
        x, g, starts, ends, first, blocks)
