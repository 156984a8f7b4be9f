"""Grouped matmul for dropless MoE: rows sorted by expert, one weight matrix per group.

Three implementations of the same product:
- "tokamax": tokamax's grouped-matmul kernel (GPU default when tokamax is installed; XLA's GPU
  ragged_dot expands to dense and is ~60x slower there, PERF.md).
- "ragged": `jax.lax.ragged_dot`, XLA's own op (fused kernels on TPU; the TPU default).
- "tiled": rows cut into fixed tiles; each (tile, expert) pair that overlaps becomes one work
  item, so there are at most tiles + E - 1 items of dense [tile, K] x [K, N] matmuls, rows
  outside the item's expert masked to zero. Exact (every row is produced by exactly one item),
  about (1 + E * tile / M) times the useful FLOPs. XLA's CPU ragged_dot expands to a dense
  all-experts product (measured ~70x slower than a batched matmul at the small preset shape),
  so this is the CPU default.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp

IMPLS = ("tokamax", "ragged", "tiled")


def default_impl() -> str:
    backend = jax.default_backend()
    if backend == "gpu" and importlib.util.find_spec("tokamax") is not None:
        return "tokamax"
    return "tiled" if backend == "cpu" else "ragged"


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, impl: str | None = None,
                   tile: int = 128) -> jax.Array:
    """x [M, K] (rows grouped by expert, in expert order), w [E, K, N], group_sizes [E] -> [M, N].

    Rows past sum(group_sizes) come out as zeros. Accumulates in fp32, returns x's dtype.
    """
    impl = impl or default_impl()
    if impl not in IMPLS:
        raise ValueError(f"grouped matmul impl {impl!r}: choose from {IMPLS}")
    w = w.astype(x.dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    if impl == "tokamax":
        import tokamax

        # fp32 accumulation happens inside the kernel; its backward needs operands of one dtype
        out = tokamax.ragged_dot(x, w, group_sizes, precision=precision, preferred_element_type=x.dtype)
    elif impl == "ragged":
        out = jax.lax.ragged_dot(x, w, group_sizes, precision=precision, preferred_element_type=jnp.float32)
    else:
        out = _tiled(x, w, group_sizes, min(tile, x.shape[0]), precision)
    return out.astype(x.dtype)


def _tiled(x, w, group_sizes, tile, precision):
    M, K = x.shape
    E, _, N = w.shape
    n_tiles = -(-M // tile)
    x = jnp.pad(x, ((0, n_tiles * tile - M), (0, 0)))
    end = jnp.cumsum(group_sizes)
    start = end - group_sizes
    first = start // tile
    span = jnp.where(group_sizes > 0, (end - 1) // tile - first + 1, 0)  # tiles each group touches
    offset = jnp.cumsum(span) - span
    n_items = n_tiles + E - 1
    item = jnp.arange(n_items)
    group = jnp.clip(jnp.searchsorted(jnp.cumsum(span), item, side="right"), 0, E - 1)  # [W]
    tile_of = jnp.clip(first[group] + item - offset[group], 0, n_tiles - 1)  # [W]
    real = item < span.sum()
    rows = tile_of[:, None] * tile + jnp.arange(tile)[None, :]  # [W, tile]
    keep = real[:, None] & (rows >= start[group][:, None]) & (rows < end[group][:, None])
    xs = x.reshape(n_tiles, tile, K)[tile_of] * keep[..., None].astype(x.dtype)  # [W, tile, K]
    ys = jnp.einsum("wtk,wkn->wtn", xs, w[group], precision=precision,
                    preferred_element_type=jnp.float32)  # [W, tile, N]
    out = jnp.zeros((n_tiles * tile, N), jnp.float32).at[rows.reshape(-1)].add(ys.reshape(-1, N))
    return out[:M]
