"""Routed-expert row movement: the dispatch gather and the weighted combine, with their gradients.

A token's K assignments (n, k) are numbered m = n*K + k. A placement puts assignment m on row
dest[m] of the expert rows (R rows; R = none) and row r holds assignment src[r] (N*K = none);
each is the other's inverse. Two implementations of the same products (`IMPLS`):
- "xla": row gathers (`take_rows`) and a weighted sum, fused by XLA (everywhere; the default
  off GPU);
- "pallas": Pallas (Triton) kernels, each a single pass over whole rows (the default on one GPU;
  on CPU they run in interpret mode). On an H200 at the bench shape (16,384 tokens x 6, D 2048) the
  dispatch moves the rows in 0.14 ms against XLA's 0.27, and the backward passes of both take 0.38 ms
  against 0.60 (docs/benchmarks.md). The combine's forward stays XLA's fused gather-reduce
  (0.14 ms; a kernel took 0.18). The kernels are token-major (each token's row read or written
  once, its K expert rows scattered or gathered), program (j, i) taking column block j of token
  block i. A scatter keeps an unplaced lane's row index out of range under its mask: a clamped
  index could be another lane's row, and interpret mode writes a masked lane's old value back.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsv3_jax.kernels.choice import forced, one_device
from dsv3_jax.kernels.vma import as_varying, struct_like, varying

IMPLS = ("pallas", "xla")
TOKENS, COLS, NUM_WARPS = 16, 256, 4  # tokens and columns a program moves (H200 sweeps)
EMPTY_ROWS = 64  # rows a program checks for emptiness at a time (`_zero_empty`)


def default_impl() -> str:
    """The impl `kernels.use` forces, else "pallas" on one GPU and "xla" elsewhere (expert-parallel
    meshes keep the XLA forms they were measured with; the CPU interpreter cannot run the kernels
    inside shard_map, so there they are not tested)."""
    if forced("row_gather"):
        return forced("row_gather")
    return "pallas" if jax.default_backend() == "gpu" and one_device() else "xla"


@jax.custom_vjp
def take_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """x [M,D] -> x[index] [len(index),D], where index == M gives a zero row.

    `index` must send distinct output rows to distinct rows of x, and `inverse` [M] be its
    inverse (for each row of x the output row holding it, len(index) if none): the gradient is
    then the gather g[inverse] instead of a scatter-add (GPU scatters of bf16 rows are slow).
    """
    return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])[index]


def _take_rows_fwd(x, index, inverse):
    return take_rows(x, index, inverse), (index, inverse)


def _take_rows_bwd(res, g):
    index, inverse = res
    return take_rows(g, inverse, index), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _chosen(impl: str | None) -> str:
    impl = impl or default_impl()
    if impl not in IMPLS:
        raise ValueError(f"row_gather impl {impl!r}: choose from {IMPLS}")
    return impl


def dispatch(x: jax.Array, K: int, src: jax.Array, dest: jax.Array, impl: str | None = None) -> jax.Array:
    """x [N,D] -> rows [R,D], row r = x[src[r] // K] (zero where src[r] = N*K). Its gradient sums
    a token's K rows in fp32 and rounds once, in both implementations."""
    if _chosen(impl) == "xla":
        return _dispatch_xla(x, K, src, dest)
    return _dispatch(x, K, src, dest)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _dispatch_xla(x, K, src, dest):
    """A custom gradient because autodiff sums the K rows in x's dtype (the transpose of the repeat)."""
    return take_rows(jnp.repeat(x, K, axis=0), src, dest)


def _dispatch_xla_fwd(x, K, src, dest):
    return _dispatch_xla(x, K, src, dest), (src, dest)


def _dispatch_xla_bwd(K, res, g):
    """A token's K row gradients summed in fp32: the combine with unit weights."""
    src, dest = res
    return _combine_xla(g, jnp.ones((dest.shape[0] // K, K), jnp.float32), src, dest).astype(g.dtype), None, None


_dispatch_xla.defvjp(_dispatch_xla_fwd, _dispatch_xla_bwd)


def combine(rows: jax.Array, weights: jax.Array, src: jax.Array, dest: jax.Array, impl: str | None = None) -> jax.Array:
    """rows [R,D], weights [N,K] -> [N,D] fp32, out[n] = sum_k weights[n,k] * rows[dest[n*K+k]]
    (rows in their own dtype, products and sum in fp32; dest = R adds nothing)."""
    if _chosen(impl) == "xla":
        return _combine_xla(rows, weights, src, dest)
    return _combine(rows, weights, src, dest)


def _combine_xla(rows, weights, src, dest):
    N, K = weights.shape
    out = take_rows(rows, dest, src).reshape(N, K, -1)  # (token, slot) order: [N*K,D] -> [N,K,D]
    return (out.astype(jnp.float32) * weights[..., None]).sum(1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _dispatch(x, K, src, dest):
    return _scatter_rows(x, K, src, dest)


def _dispatch_fwd(x, K, src, dest):
    return _dispatch(x, K, src, dest), dest


def _dispatch_bwd(K, dest, g):
    return _gather_sum(g, dest.reshape(-1, K)), None, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def _combine(rows, weights, src, dest):
    return _combine_xla(rows, weights, src, dest)


def _combine_fwd(rows, weights, src, dest):
    return _combine(rows, weights, src, dest), (rows, weights, src, dest)


def _combine_bwd(res, g):
    """g is rounded to the rows' dtype, which is exact in the model: the combine's output is
    rounded to the compute dtype, so its cotangent is a compute-dtype value."""
    rows, weights, src, dest = res
    return (*_combine_grads(rows, g.astype(rows.dtype), weights, src, dest), None, None)


_combine.defvjp(_combine_fwd, _combine_bwd)


def _cols(D: int) -> int:
    """Columns a program moves: COLS, or the largest power of two dividing D below it."""
    return math.gcd(D, COLS)


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def _call(kernel, grid, out_shape, *args):
    """A row kernel over `grid`, every operand whole (the kernels index rows themselves), under
    shard_map typed as varying like its operands."""
    axes = frozenset().union(*map(varying, args))
    args = [as_varying(a, axes) for a in args]
    interpret = _interpret()
    params = None if interpret else plt.CompilerParams(num_warps=NUM_WARPS, num_stages=1)
    return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, interpret=interpret, compiler_params=params)(*args)


def _blocks(N: int, R: int) -> tuple[int, int]:
    """-> (token blocks, pieces of EMPTY_ROWS rows each program checks for emptiness: together >= R)."""
    n_blocks = pl.cdiv(N, TOKENS)
    return n_blocks, pl.cdiv(pl.cdiv(R, n_blocks), EMPTY_ROWS)


def _slot_major(a: jax.Array, K: int) -> jax.Array:
    """[N*K] or [N,K] by (token, slot) -> [K*N]: each slot's entries for a block of tokens contiguous."""
    return a.reshape(-1, K).T.reshape(-1)


def _zero_empty(src_ref, out_ref, i, j, pieces: int, bd: int, M: int) -> None:
    """Zero column block j of the empty rows (src = M) among program i's `pieces` x EMPTY_ROWS rows."""
    for c in range(pieces):
        first = (i * pieces + c) * EMPTY_ROWS
        rows = pl.ds(first, EMPTY_ROWS)
        empty = plt.load(src_ref.at[rows], mask=first + jnp.arange(EMPTY_ROWS) < out_ref.shape[0], other=0) == M
        plt.store(out_ref.at[rows, pl.ds(j * bd, bd)], jnp.zeros((EMPTY_ROWS, bd), out_ref.dtype), mask=empty[:, None])


def _scatter_rows(x: jax.Array, K: int, src: jax.Array, dest: jax.Array) -> jax.Array:
    """x [N,D] -> rows [R,D]: x[n] on row dest[n*K+k] of each slot k (R: on none), zero on the
    empty rows (src = N*K). Each token's row is read once (H200, bench shape: 0.140 ms against
    0.146 for a kernel walking the rows and gathering each one's token)."""
    N, D = x.shape
    R, bt, bd = src.shape[0], TOKENS, _cols(D)
    n_blocks, pieces = _blocks(N, R)

    def kernel(dest_ref, src_ref, x_ref, out_ref):
        j, i = pl.program_id(0), pl.program_id(1)
        live = i * bt + jnp.arange(bt) < N
        cols = (j * bd + jnp.arange(bd))[None, :]
        xb = plt.load(x_ref.at[pl.ds(i * bt, bt), pl.ds(j * bd, bd)], mask=live[:, None], other=0)
        for k in range(K):
            r = plt.load(dest_ref.at[pl.ds(k * N + i * bt, bt)], mask=live, other=R)
            plt.store(out_ref.at[r[:, None], cols], xb, mask=(r < R)[:, None])
        _zero_empty(src_ref, out_ref, i, j, pieces, bd, N * K)

    return _call(kernel, (D // bd, n_blocks), struct_like((R, D), x.dtype, x), _slot_major(dest, K), src, x)


def _gather_sum(src: jax.Array, idx: jax.Array) -> jax.Array:
    """src [S,D], idx [N,K] -> [N,D] in src's dtype, out[n] = sum_k src[idx[n,k]] summed in fp32
    (idx >= S adds nothing) (H200, bench shape: 0.125 ms against 0.148 with 32 tokens a program
    and token blocks first in the grid)."""
    S, D = src.shape
    N, K = idx.shape
    bt, bd = TOKENS, _cols(D)

    def kernel(idx_ref, src_ref, out_ref):
        j, i = pl.program_id(0), pl.program_id(1)
        tok = i * bt + jnp.arange(bt)
        cols = j * bd + jnp.arange(bd)
        acc = jnp.zeros((bt, bd), jnp.float32)
        for k in range(K):
            r = plt.load(idx_ref.at[pl.ds(k * N + i * bt, bt)], mask=tok < N, other=S)
            x = plt.load(src_ref.at[jnp.minimum(r, S - 1)[:, None], cols[None, :]], mask=(r < S)[:, None], other=0)
            acc += x.astype(jnp.float32)
        plt.store(out_ref.at[pl.ds(i * bt, bt), pl.ds(j * bd, bd)], acc.astype(out_ref.dtype), mask=(tok < N)[:, None])

    return _call(kernel, (D // bd, pl.cdiv(N, bt)), struct_like((N, D), src.dtype, src), _slot_major(idx, K), src)


def _combine_grads(rows: jax.Array, g: jax.Array, w: jax.Array, src: jax.Array, dest: jax.Array):
    """The weighted combine's gradients in one pass, token-major: rows [R,D], g [N,D] (the
    combine's cotangent), w [N,K], src [R], dest [N*K] ->
    d_rows [R,D] = w[n,k] * g[n] on row dest[n*K+k] in rows' dtype (zero on empty rows),
    d_w [N,K] = <rows[dest[n*K+k]], g[n]> in fp32 (zero for an assignment on no row).

    Program (j, i) reads column block j of token block i's cotangents once and gathers and
    scatters their K rows' blocks; it also zeroes the empty rows of its share of the rows. Each
    column block's dot products are summed after. Walking the rows instead read each cotangent K
    times (H200, bench shape: 0.25 ms against 0.32)."""
    R, D = rows.shape
    N, K = w.shape
    M = N * K
    bt, bd = TOKENS, _cols(D)
    n_blocks, pieces = _blocks(N, R)

    def kernel(dest_ref, w_ref, src_ref, rows_ref, g_ref, drows_ref, dw_ref):
        j, i = pl.program_id(0), pl.program_id(1)
        live = i * bt + jnp.arange(bt) < N
        cols = (j * bd + jnp.arange(bd))[None, :]
        gb = plt.load(g_ref.at[pl.ds(i * bt, bt), pl.ds(j * bd, bd)], mask=live[:, None], other=0).astype(jnp.float32)
        for k in range(K):
            at = pl.ds(k * N + i * bt, bt)
            r = plt.load(dest_ref.at[at], mask=live, other=R)
            wk = plt.load(w_ref.at[at], mask=live, other=0)[:, None]
            placed = (r < R)[:, None]
            x = plt.load(rows_ref.at[jnp.minimum(r, R - 1)[:, None], cols], mask=placed, other=0).astype(jnp.float32)
            plt.store(drows_ref.at[r[:, None], cols], (gb * wk).astype(drows_ref.dtype), mask=placed)
            plt.store(dw_ref.at[j, at], (x * gb).sum(1), mask=live)
        _zero_empty(src_ref, drows_ref, i, j, pieces, bd, M)

    d_rows, d_w = _call(kernel, (D // bd, n_blocks),
                        (struct_like((R, D), rows.dtype, rows), struct_like((D // bd, M), jnp.float32, rows)),
                        _slot_major(dest, K), _slot_major(w, K), src, rows, g)
    return d_rows, d_w.sum(0).reshape(K, N).T
