"""Grouped matmul for dropless MoE: rows sorted by expert, one weight matrix per group."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, K] (rows grouped by expert, in expert order), w [E, K, N], group_sizes [E] -> [M, N].

    Rows past sum(group_sizes) come out as zeros. Accumulates in fp32, returns x's dtype.
    """
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    out = jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes.astype(jnp.int32),
                             precision=precision, preferred_element_type=jnp.float32)
    return out.astype(x.dtype)
