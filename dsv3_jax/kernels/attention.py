"""Attention core softmax(q k^T * scale + mask) v, with q/k head dim != v head dim (MLA: 192/128)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """q [B,T,H,K], k [B,S,H,K], v [B,S,H,Kv], mask [B|1,1,T,S] (True = attend) -> [B,T,H,Kv].

    Scores accumulate in fp32 and the softmax runs in fp32; the probabilities are rounded to
    the compute dtype before the value product (as HF and the official code do).
    """
    scores = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bhts,bshk->bthk", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
