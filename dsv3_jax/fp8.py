"""DeepSeek-V3's fine-grained FP8 recipe (SPEC F): E4M3 operands, online block scales.

Every FP8 tensor is E4M3 with scale = amax / 448 taken from the current values (optionally
rounded up to a power of two). Activations and activation gradients are scaled per 1x128 tile
(one row, 128 channels of the contracted dim), weights per 128x128 block. The weight-gradient
GEMM contracts over tokens, so both of its operands are re-tiled 128x1 (the cached activation
is dequantised, transposed and requantised, as in the paper); for the routed experts' grouped
GEMM these tiles restart at every expert's first row, so no scale mixes two experts' tokens.
Dims that are not multiples of 128 are zero-padded (zeros change neither amax nor any product).

Each GEMM splits K into 128-wide chunks; a chunk's product of FP8 values is promoted to FP32,
multiplied by its two scales there and summed in FP32 (the paper's N_C = 128 promotion).
`Recipe(accumulation_bits=13)` models Hopper's limited-precision tensor-core accumulator
instead: each `mma_k`-wide partial sum is added to an accumulator truncated to that many
mantissa bits, which is promoted to FP32 every `promotion_interval` elements.

`Recipe(native=True)` runs the same chunked product with real FP8 `dot_general`s (cuBLASLt FP8
GEMMs on Hopper) on the same grid, or as one Pallas kernel (`kernels.scaled_matmul`, the default
on one GPU).
Linear inputs are cached for the backward pass in FP8.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from dsv3_jax.kernels import scaled_matmul
from dsv3_jax.kernels.grouped_matmul import grouped_matmul as _grouped_matmul
from dsv3_jax.kernels.vma import vary_like

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128
ROW, BLOCK, COL = (1, TILE), (TILE, TILE), (TILE, 1)  # activation tile, weight block, wgrad tile


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How an FP8 GEMM is computed (hashable: it is static model structure).

    native: real FP8 dots (GPU) instead of FP32 emulation of them.
    pow2_scales: round each scale up to a power of two (dequantised values are then exact in BF16).
    accumulation_bits: None = exact FP32 within a chunk; else mantissa bits kept by the modelled
      tensor-core accumulator between promotions (Hopper: about 13 + the implicit one).
    promotion_interval: N_C, K elements between promotions to FP32 (multiple of mma_k).
    mma_k: K elements of one tensor-core instruction (32 for FP8 WGMMA).
    """

    native: bool = False
    pow2_scales: bool = False
    accumulation_bits: int | None = None
    promotion_interval: int = TILE
    mma_k: int = 32

    def __post_init__(self):
        if self.mma_k <= 0 or TILE % self.mma_k:
            raise ValueError(f"Recipe: mma_k={self.mma_k} must be a positive divisor of {TILE}")
        if self.promotion_interval <= 0 or self.promotion_interval % self.mma_k:
            raise ValueError(f"Recipe: promotion_interval={self.promotion_interval} must be a positive multiple "
                             f"of mma_k={self.mma_k}")
        if self.accumulation_bits is not None and not 1 <= self.accumulation_bits <= 23:
            raise ValueError(f"Recipe: accumulation_bits={self.accumulation_bits} must be in 1..23 "
                             "(the bits of an fp32 mantissa)")


PRECISIONS = ("bf16", "fp8_emulated", "fp8_native")


_active = contextvars.ContextVar("dsv3_fp8_recipe", default=None)


def recipe_for(precision: str, pow2_scales: bool = False) -> Recipe | None:
    """The `--precision` switch: None (plain compute-dtype GEMMs) or the FP8 recipe."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose from {PRECISIONS}")
    if precision == "bf16":
        return None
    return Recipe(native=precision == "fp8_native", pow2_scales=pow2_scales)


@contextlib.contextmanager
def use(recipe: Recipe | None):
    """Models traced inside this context run their projections under `recipe` (None: plain).

    Read at trace time, like `parallel.expert_transport`: the train step enters it around the
    model call, so the model code never branches on precision.
    """
    token = _active.set(recipe)
    try:
        yield
    finally:
        _active.reset(token)


def active() -> Recipe | None:
    """The recipe of the enclosing `use` context (None outside one)."""
    return _active.get()


# ---------------------------------------------------------------------------------------------
# quantisation


def pad_to(x: jax.Array, multiples: tuple[int, ...]) -> jax.Array:
    """Zero-pad each dim of x up to a multiple of the matching entry."""
    return jnp.pad(x, [(0, -n % m) for n, m in zip(x.shape, multiples, strict=True)])


def scales(amax: jax.Array, pow2: bool = False) -> jax.Array:
    """amax / 448 (1 where amax is 0), optionally rounded up to a power of two; fp32.

    Floored at the smallest normal fp32: a tiny tile's amax / 448 would underflow or be flushed
    to 0, and x / 0 is NaN. An inf or NaN amax keeps its non-finite scale (with pow2 too), so
    the tile dequantises to NaN instead of saturating at 448 unnoticed.
    Written amax * fp32(1/448): XLA rewrites division by a constant that way, so say so.
    """
    amax = amax.astype(jnp.float32)
    s = jnp.where(amax == 0, 1.0, jnp.maximum(amax * jnp.float32(1 / E4M3_MAX), jnp.finfo(jnp.float32).tiny))
    if not pow2:
        return s
    m, e = jnp.frexp(s)  # s = m * 2^e, m in [0.5, 1): the next power of two is 2^e unless m = 0.5
    return jnp.where(jnp.isfinite(s), jnp.ldexp(jnp.ones_like(s), jnp.where(m == 0.5, e - 1, e)), s)


def quantize(x: jax.Array, tile: tuple[int, int], pow2: bool = False) -> tuple[jax.Array, jax.Array]:
    """x [R,C] (multiples of tile) -> E4M3 values [R,C], fp32 scales [R/tr, C/tc]; x ~ q * s."""
    (R, C), (tr, tc) = x.shape, tile
    if R % tr or C % tc:
        raise ValueError(f"fp8.quantize: shape {x.shape} is not whole {tr}x{tc} tiles (pad_to first)")
    xt = x.astype(jnp.float32).reshape(R // tr, tr, C // tc, tc)  # [R,C] -> [Rt,tr,Ct,tc]
    s = scales(jnp.abs(xt).max(axis=(1, 3)), pow2)  # [Rt,Ct]
    q = jnp.clip(xt / s[:, None, :, None], -E4M3_MAX, E4M3_MAX).astype(E4M3)
    return q.reshape(R, C), s


def dequantize(q: jax.Array, s: jax.Array, tile: tuple[int, int]) -> jax.Array:
    """Inverse of `quantize`: q [R,C] E4M3, s [R/tr, C/tc] -> fp32 [R,C]."""
    (R, C), (tr, tc) = q.shape, tile
    if R % tr or C % tc or s.shape != (R // tr, C // tc):  # else a scale row or column would broadcast
        raise ValueError(f"fp8.dequantize: scales of shape {s.shape} for values {q.shape} in {tr}x{tc} tiles; "
                         f"need {(R // tr, C // tc)} and whole tiles")
    return q.astype(jnp.float32) * jnp.repeat(jnp.repeat(s, tr, axis=0), tc, axis=1)


def fake_quantize(x: jax.Array, tile: tuple[int, int], pow2: bool = False) -> jax.Array:
    """x [R,C] (any size) rounded to its FP8 grid, fp32 [R,C]."""
    R, C = x.shape
    return dequantize(*quantize(pad_to(x, tile), tile, pow2), tile)[:R, :C]


def _expert_slots(group_sizes: jax.Array, M: int) -> tuple[jax.Array, jax.Array]:
    """Rows grouped by expert laid out in 128-row tiles that restart at each expert's first row:
    each row's slot [M], each slot's row [T*128] (M where the slot is empty).

    Row r of expert e goes to tile (e, (r - start_e) // 128), tiles in row order; rows past
    sum(group_sizes) (padding) tile on as one more group. T = M // 128 + E + 1 bounds the tile
    count statically: each group adds at most one partial tile to the full ones.
    """
    ends = jnp.cumsum(group_sizes)  # [E]
    starts = jnp.concatenate([ends - group_sizes, ends[-1:]])  # [E+1], the padding group last
    first = jnp.concatenate([jnp.zeros(1, ends.dtype), jnp.cumsum(-(-group_sizes // TILE))])  # [E+1] tiles before
    rows = jnp.arange(M, dtype=ends.dtype)
    group = jnp.searchsorted(ends, rows, side="right")  # [M], E for padding rows
    slot = TILE * first[group] + rows - starts[group]
    T = M // TILE + group_sizes.shape[0] + 1
    return slot, jnp.full(T * TILE, M, rows.dtype).at[slot].set(rows, indices_are_sorted=True, unique_indices=True)


def grouped_fake_quantize(x: jax.Array, group_sizes: jax.Array, pow2: bool = False) -> jax.Array:
    """x [M,K] rows grouped by expert -> fp32 [M,K] on the FP8 grid of 128x1 tiles per expert.

    `fake_quantize(x, COL)` with tiles starting at each expert's first row (DeepSeek's grouped
    GEMM aligns every expert to 128 rows), so one expert's scales never see another's values:
    the rows are gathered into per-expert tiles zero-padded to 128 rows, and back. Not a
    `jax.ops.segment_max` over rows (atomics: 20-30x slower on the H200 at K = 2048-7168), nor a
    bare `astype(E4M3).astype(float32)` on the rows: XLA on GPU folds that round trip away.
    """
    slot, row = _expert_slots(group_sizes, x.shape[0])
    padded = x.astype(jnp.float32).at[row].get(mode="fill", fill_value=0)  # [T*128, K]
    return fake_quantize(padded, COL, pow2)[slot]


# ---------------------------------------------------------------------------------------------
# the chunk-scaled GEMM


def _truncate(x: jax.Array, bits: int) -> jax.Array:
    """fp32 x with its mantissa cut to `bits` bits (round toward zero, as tensor cores align)."""
    mask = jnp.uint32((0xFFFFFFFF << (23 - bits)) & 0xFFFFFFFF)
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(x, jnp.uint32) & mask, jnp.float32)


def scaled_dot(aq: jax.Array, a_s: jax.Array, bq: jax.Array, b_s: jax.Array, recipe: Recipe) -> jax.Array:
    """sum over 128-chunks c of a_s[m,c] * b_s[c,n] * (aq[m,c] . bq[c,n]), fp32.

    aq [M,K] / bq [K,N] E4M3 (K a multiple of 128), a_s [M,K/128], b_s [K/128,N] -> [M,N].
    Native without accumulator modelling: the impl `kernels.scaled_matmul` picks.
    """
    scaled_matmul.check_shapes(aq, a_s, bq, b_s)
    if recipe.native and recipe.accumulation_bits is None and scaled_matmul.default_impl() == "pallas":
        return scaled_matmul.pallas(aq, a_s, bq, b_s)
    (M, K), N = aq.shape, bq.shape[1]
    g = recipe.mma_k if recipe.accumulation_bits is not None else TILE  # K elements per partial sum
    G = K // g
    a, b = aq.reshape(M, G, g), bq.reshape(G, g, N)  # [M,K] -> [M,G,g]; [K,N] -> [G,g,N]
    if recipe.native:
        part = jax.lax.dot_general(a, b, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.float32)
    else:
        part = jnp.einsum("mgk,gkn->gmn", a.astype(jnp.float32), b.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)  # [G,M,N]
    per = TILE // g  # partial sums per scale chunk
    part = part * jnp.repeat(a_s.T, per, axis=0)[:, :, None] * jnp.repeat(b_s, per, axis=0)[:, None, :]
    if recipe.accumulation_bits is None:
        return part.sum(0)
    steps = min(recipe.promotion_interval, K) // g  # partial sums between promotions
    part = pad_to(part, (steps, 1, 1)).reshape(-1, steps, M, N)  # [G,M,N] -> [P,steps,M,N]

    def add(acc, p):  # the tensor-core accumulator: limited precision
        acc = _truncate(acc + p, recipe.accumulation_bits)
        return acc, None

    acc, _ = jax.lax.scan(add, jnp.zeros(part.shape[:1] + (M, N), jnp.float32), jnp.moveaxis(part, 1, 0))
    return acc.sum(0)  # promotions, accumulated in fp32


def _block_scales_along(s: jax.Array, n: int) -> jax.Array:
    """128x128 block scales [Kb,Nb] -> per-column scales [Kb, n] (n = Nb * 128)."""
    return jnp.repeat(s, TILE, axis=1)[:, :n]


# ---------------------------------------------------------------------------------------------
# the FP8 linear: x [M,K] @ w [K,N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(x: jax.Array, w: jax.Array, recipe: Recipe, dtype) -> jax.Array:
    """x [M,K] @ w [K,N] -> [M,N] in `dtype`, all three GEMMs on FP8 operands (module docstring)."""
    return _matmul_fwd(x, w, recipe, dtype)[0]


def _matmul_fwd(x, w, recipe, dtype):
    N = w.shape[1]
    xq, xs = quantize(pad_to(x, ROW), ROW, recipe.pow2_scales)  # [M,Kp], [M,Kp/128]
    wq, ws = quantize(pad_to(w, BLOCK), BLOCK, recipe.pow2_scales)  # [Kp,Np], [Kp/128,Np/128]
    y = scaled_dot(xq, xs, wq, _block_scales_along(ws, wq.shape[1]), recipe)[:, :N]
    like = (jnp.zeros((0, x.shape[1]), x.dtype), jnp.zeros((0, N), w.dtype))  # shapes/dtypes of x, w
    return y.astype(dtype), (xq, xs, wq, ws, like)


def _matmul_bwd(recipe, dtype, res, g):
    xq, xs, wq, ws, (x_like, w_like) = res
    K, N = x_like.shape[1], w_like.shape[1]
    pow2 = recipe.pow2_scales
    gq, gs = quantize(pad_to(g, ROW), ROW, pow2)  # dgrad: 1x128 tiles along N
    dx = scaled_dot(gq, gs, wq.T, _block_scales_along(ws.T, wq.shape[0]), recipe)[:, :K]  # [M,K]
    x_t, x_ts = quantize(pad_to(dequantize(xq, xs, ROW), COL), COL, pow2)  # re-tiled 128x1: [Mp,Kp]
    g_t, g_ts = quantize(pad_to(g, COL), COL, pow2)  # [Mp,N], [Mp/128,N]
    dw = scaled_dot(x_t.T, x_ts.T, g_t, g_ts, recipe)[:K, :N]  # [K,N]
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def einsum(spec: str, x: jax.Array, w: jax.Array, *, dtype, recipe: Recipe) -> jax.Array:
    """`layers.einsum` under the FP8 recipe: specs "...k,kn->...n" (x's last dim against w's first)."""
    inputs, out = spec.replace(" ", "").split("->")
    xs_, ws_ = inputs.split(",")
    if len(ws_) != 2 or xs_[-1] != ws_[0] or out != xs_[:-1] + ws_[1]:
        raise ValueError(f"fp8 einsum {spec!r}: only '...k,kn->...n' projections are supported")
    y = matmul(x.reshape(-1, x.shape[-1]), w, recipe, dtype)  # [..., K] -> [M,K]
    return y.reshape(x.shape[:-1] + (w.shape[1],))


# ---------------------------------------------------------------------------------------------
# the FP8 grouped matmul (routed experts)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, recipe: Recipe | None = None) -> jax.Array:
    """x [M,K] rows grouped by expert, w [E,K,N] -> [M,N] in x's dtype; FP8 when `recipe` is set."""
    if recipe is None:
        return _grouped_matmul(x, w, group_sizes)
    return _fp8_grouped(x, w, group_sizes, recipe)


def _expert_quantize(w: jax.Array, pow2: bool) -> tuple[jax.Array, jax.Array]:
    """w [E,K,N] -> per-expert 128x128 blocks: E4M3 [E,Kp,Np], scales [E,Kp/128,Np/128]."""
    return jax.vmap(lambda we: quantize(pad_to(we, BLOCK), BLOCK, pow2))(w)


def _expert_dequantize(wq: jax.Array, ws: jax.Array, K: int, N: int) -> jax.Array:
    return jax.vmap(lambda q, s: dequantize(q, s, BLOCK))(wq, ws)[:, :K, :N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fp8_grouped(x, w, group_sizes, recipe):
    """Operands on the recipe's grid, products in fp32 (emulated) or the compute dtype (native).

    The grouped kernels take no per-chunk scales, so each operand is dequantised first; that
    is the chunk-scaled FP32 sum up to FP32 rounding, and exact in BF16 with power-of-two scales.
    The weight gradient's 128x1 tiles restart at each expert (`grouped_fake_quantize`).
    """
    return _fp8_grouped_fwd(x, w, group_sizes, recipe)[0]


def _grid_dtype(recipe: Recipe, dtype):
    return dtype if recipe.native else jnp.float32


def _fp8_grouped_fwd(x, w, group_sizes, recipe):
    K, N = x.shape[1], w.shape[2]
    xq, xs = quantize(pad_to(x, ROW), ROW, recipe.pow2_scales)  # [M,Kp], [M,Kp/128]
    wq, ws = _expert_quantize(w, recipe.pow2_scales)
    ct = _grid_dtype(recipe, x.dtype)
    y = _grouped_matmul(dequantize(xq, xs, ROW)[:, :K].astype(ct), _expert_dequantize(wq, ws, K, N).astype(ct),
                        group_sizes)
    like = (vary_like(jnp.zeros((0, K), x.dtype), x), vary_like(jnp.zeros((0, N), w.dtype), w))  # x's, w's types
    return y.astype(x.dtype), (xq, xs, wq, ws, group_sizes, like)


def _fp8_grouped_bwd(recipe, res, g):
    xq, xs, wq, ws, group_sizes, (x_like, w_like) = res
    (M, N), K = g.shape, x_like.shape[1]
    pow2, ct = recipe.pow2_scales, _grid_dtype(recipe, x_like.dtype)
    wd = _expert_dequantize(wq, ws, K, N).astype(ct)
    g_row = fake_quantize(g, ROW, pow2).astype(ct)  # dgrad: 1x128 tiles along N
    _, dx_fn = jax.vjp(lambda x_: _grouped_matmul(x_, wd, group_sizes), vary_like(jnp.zeros((M, K), ct), x_like))
    x_col = grouped_fake_quantize(dequantize(xq, xs, ROW)[:, :K], group_sizes, pow2).astype(ct)  # wgrad: 128x1
    g_col = grouped_fake_quantize(g, group_sizes, pow2).astype(ct)  # tiles, restarting at each expert
    _, dw_fn = jax.vjp(lambda w_: _grouped_matmul(x_col, w_, group_sizes), wd)
    return dx_fn(g_row)[0].astype(x_like.dtype), dw_fn(g_col)[0].astype(w_like.dtype), None


_fp8_grouped.defvjp(_fp8_grouped_fwd, _fp8_grouped_bwd)


def residual_bytes(f, *args) -> int:
    """Bytes of the residuals `jax.vjp(f, *args)` keeps for the backward pass."""
    _, vjp_fn = jax.vjp(f, *args)
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(vjp_fn) if hasattr(a, "dtype"))
