"""Attention core softmax(q k^T * scale + mask) v, with q/k head dim != v head dim (MLA: 192/128).

Two implementations of the same op: "xla" (plain einsums, fp32 softmax; every backend) and
"tokamax" (tokamax's flash attention, which takes v's head dim as it is: GPU default when
tokamax is installed).
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp

from dsv3_jax.kernels.choice import forced

IMPLS = ("xla", "tokamax")


def default_impl() -> str:
    """The impl `kernels.use` forces, else tokamax on GPU where installed, else xla."""
    if forced("attention"):
        return forced("attention")
    gpu = jax.default_backend() == "gpu"
    return "tokamax" if gpu and importlib.util.find_spec("tokamax") is not None else "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
                          impl: str | None = None) -> jax.Array:
    """q [B,T,H,K], k [B,S,H,K], v [B,S,H,Kv], mask [B|1,1,T,S] (True = attend; None = causal,
    T == S) -> [B,T,H,Kv].

    Scores accumulate in fp32 and the softmax runs in fp32; the probabilities are rounded to
    the compute dtype before the value product (as HF and the official code do).
    """
    impl = impl or default_impl()
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r}: choose from {IMPLS}")
    if impl == "tokamax":
        import tokamax

        return tokamax.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=mask is None)
    if mask is None:
        mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
    scores = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bhts,bshk->bthk", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
