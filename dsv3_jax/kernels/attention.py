"""Attention core softmax(q k^T * scale + mask) v, with q/k head dim != v head dim (MLA: 192/128).

Two implementations of the same op: "xla" (plain einsums, fp32 softmax; every backend) and
"tokamax" (tokamax's flash attention, which takes v's head dim as it is: GPU default when
tokamax is installed).

Under a mesh whose every axis splits the batch or the heads, the op runs per device inside
`shard_map` on its own rows and heads: the SPMD partitioner cannot split tokamax's kernels,
and left to it the backward pass gathered the whole batch onto every device (measured on
2 H200s at expert=2).
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp

from dsv3_jax.kernels.choice import forced
from dsv3_jax.parallel.mesh import activation_spec

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
    fn = functools.partial(_tokamax if impl == "tokamax" else _xla, scale=scale)
    heads = activation_spec("batch", None, "act_heads", None, shape=q.shape)
    if heads is None or _split_axes(heads) != _split_axes(jax.sharding.get_abstract_mesh()):
        return fn(q, k, v, mask)  # no mesh, or not split over every axis: left to the partitioner
    mask_spec = None if mask is None else activation_spec(
        "batch" if mask.shape[0] == q.shape[0] else None, None, None, None, shape=mask.shape)
    # every device computes only its own slice (no collectives, nothing replicated), so the
    # varying-axes check, which tokamax's Mosaic kernels do not support, is not needed
    return jax.shard_map(fn, in_specs=(heads, heads, heads, mask_spec), out_specs=heads,
                         check_vma=False)(q, k, v, mask)


def _split_axes(x) -> set[str]:
    """Mesh axes of size > 1 (of a mesh), or those a PartitionSpec splits over."""
    if isinstance(x, jax.sharding.PartitionSpec):
        return {a for part in x if part for a in ((part,) if isinstance(part, str) else part)}
    return {a for a, n in x.shape.items() if n > 1}


def _tokamax(q, k, v, mask, scale):
    import tokamax

    return tokamax.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=mask is None)


def _xla(q, k, v, mask, scale):
    if mask is None:
        mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
    scores = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bhts,bshk->bthk", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
