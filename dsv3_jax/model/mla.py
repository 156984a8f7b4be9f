"""Multi-head Latent Attention (SPEC B): the training / prefill path and the latent-cache path.

Queries go through a low-rank bottleneck (or one projection when q_lora_rank is None); keys
and values are rebuilt per head from a shared latent c (kv_lora_rank) plus one rotary key
k_pe shared by all heads. Only q_pe and k_pe are rotated.

The cached path ("absorb mode", SPEC B) stores per token only the normalised latent and the
rotated k_pe (R + Kr values per layer, 576 for V3) and never rebuilds per-head keys or values:
W_UK is folded into the query and W_UV is applied after attention.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax import fp8
from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels.attention import dot_product_attention
from dsv3_jax.kernels.latent_attention import latent_attention, merge_chunks
from dsv3_jax.model.layers import Linear, RMSNorm, broadcast_new_axis, einsum, einsum_f32
from dsv3_jax.model.rope import apply_rope, apply_rope_tail
from dsv3_jax.parallel.mesh import constrain

# The latent norms are built with RMSNorm's default eps in both references, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class LatentCache(NamedTuple):
    """One layer stack's decode cache, preallocated for S slots (slot = token position).

    latent [L,B,S,R]: kv_a_norm(c), the normalised latent; k_pe [L,B,S,Kr]: the rotated rope key.
    """

    latent: jax.Array
    k_pe: jax.Array


class CacheView(NamedTuple):
    """What one layer of a scanned stack needs: the stack's cache, its index in the stack, and
    the slots [B,T] its new tokens are written to (their positions)."""

    cache: LatentCache
    layer: jax.Array
    slots: jax.Array


class MLA(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        c = config
        kw = dict(std=c.initializer_range, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        H = c.num_attention_heads
        if c.q_lora_rank is None:
            self.q_proj = Linear(c.hidden_size, H * c.qk_head_dim, axes=("embed", "heads"), **kw)
        else:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, axes=("embed", "latent"), **kw)
            self.q_a_norm = RMSNorm(c.q_lora_rank, eps=LATENT_NORM_EPS, dtype=dtype, param_dtype=param_dtype)
            self.q_b_proj = Linear(c.q_lora_rank, H * c.qk_head_dim, axes=("latent", "heads"), **kw)
        self.kv_a_proj = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, axes=("embed", "latent"), **kw)
        self.kv_a_norm = RMSNorm(c.kv_lora_rank, eps=LATENT_NORM_EPS, dtype=dtype, param_dtype=param_dtype)
        self.kv_b_proj = Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), axes=("latent", "heads"),
                                **kw)
        self.o_proj = Linear(H * c.v_head_dim, c.hidden_size, axes=("heads", "embed"), **kw)
        self.config = config

    def _project(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B,T,D] -> q [B,T,H,Kn+Kr] (q_nope, then the rotated q_pe), the normalised latent
        [B,T,R] and the rotated k_pe [B,T,Kr] (what the cache holds)."""
        c = self.config
        B, T, _ = x.shape
        R = c.kv_lora_rank
        with jax.named_scope("qkv_a"):
            q_a, kv_a = self._down(x)  # [B,T,Rq] (x itself without a query bottleneck), [B,T,R+Kr]
        with jax.named_scope("q"):
            q = self.q_proj(q_a) if c.q_lora_rank is None else self.q_b_proj(self.q_a_norm(q_a))
            q = q.reshape(B, T, c.num_attention_heads, c.qk_head_dim)  # [B,T,H*K] -> [B,T,H,K]
            q = apply_rope_tail(q, cos, sin)
        with jax.named_scope("kv_a"):
            return q, self.kv_a_norm(kv_a[..., :R]), apply_rope(kv_a[..., R:], cos, sin)

    def _down(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B,T,D] -> q_a [B,T,Rq] (x without a query bottleneck), kv_a [B,T,R+Kr].

        With a bottleneck both come from one product of x and the two weights side by side
        [D, Rq+R+Kr]: its input gradient is one GEMM instead of two summed, and one wide GEMM
        runs faster than two narrow ones. q_a's columns are padded to the FP8 weight block so
        that under a recipe every 128x128 block lies within one weight, as when quantised apart.
        """
        c = self.config
        if c.q_lora_rank is None:
            return x, self.kv_a_proj(x)
        w_q, w_kv = self.q_a_proj.kernel[...], self.kv_a_proj.kernel[...]
        pad = -c.q_lora_rank % fp8.TILE
        w = jnp.concatenate([w_q, jnp.zeros((w_q.shape[0], pad), w_q.dtype), w_kv], axis=1)  # [D,Rq+pad+R+Kr]
        y = einsum("...d,df->...f", x, w, dtype=self.kv_a_proj.dtype, recipe=fp8.active())
        q_a, _, kv_a = jax.lax.split(y, (c.q_lora_rank, pad, w_kv.shape[1]), axis=-1)
        return q_a, kv_a

    def _kv_b_heads(self) -> jax.Array:
        """kv_b's weight per head: [R,H*(Kn+Kv)] -> [R,H,Kn+Kv] (W_UK, then W_UV)."""
        c = self.config
        return self.kv_b_proj.kernel[...].reshape(c.kv_lora_rank, c.num_attention_heads, -1)

    def _keys_values(self, latent: jax.Array) -> tuple[jax.Array, jax.Array]:
        """latent [B,T,R] -> k_nope [B,T,H,Kn], v [B,T,H,Kv]: kv_b's W_UK and W_UV columns as two
        products, so that neither is sliced out of a joint output nor their gradients joined
        (bench step on an H200: -1.2 ms). Under FP8 each is blocked on its own: the joint
        weight's 128x128 blocks when Kn and Kv are multiples of 128, as in V3."""
        c = self.config
        B, T, R = latent.shape
        H, Kn, Kv = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
        w = self._kv_b_heads()
        kw = dict(dtype=self.kv_b_proj.dtype, recipe=fp8.active())
        k_nope = einsum("btr,rn->btn", latent, w[..., :Kn].reshape(R, H * Kn), **kw)
        v = einsum("btr,rn->btn", latent, w[..., Kn:].reshape(R, H * Kv), **kw)
        return k_nope.reshape(B, T, H, Kn), v.reshape(B, T, H, Kv)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, starts: jax.Array | None) -> jax.Array:
        """x [B,T,D], cos/sin [B,T,Kr/2], starts [B,T] (causal within documents starting there,
        `kernels.attention.document_starts`; None: one document a row) -> [B,T,D]."""
        c = self.config
        B, T, _ = x.shape
        H, Kr, Kv = c.num_attention_heads, c.qk_rope_head_dim, c.v_head_dim
        q, latent, k_pe = self._project(x, cos, sin)  # k_pe shared by all heads
        with jax.named_scope("kv"):
            k_nope, v = self._keys_values(latent)
        heads = ("batch", None, "act_heads", None)
        q = constrain(q, *heads)  # [B,T,H,Kn+Kr]
        k = tuple(constrain(p, *heads) for p in (k_nope, broadcast_new_axis(k_pe, (B, T, H, Kr), 2)))  # its parts
        v = constrain(v, *heads)
        with jax.named_scope("core"):
            o = constrain(dot_product_attention(q, k, v, starts, c.softmax_scale), *heads)  # [B,T,H,Kv]
            o = checkpoint_name(o, "attention_out")  # kept under remat "selective"
        return self.o_proj(o.reshape(B, T, H * Kv))

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, view: CacheView) -> tuple[jax.Array, LatentCache]:
        """Absorbed attention over the latent cache: x [B,T,D] new tokens at slots `view.slots`,
        cos/sin [B,T,Kr/2] -> ([B,T,D], the cache with this layer's slots written).

        1. Write the new tokens' latent and k_pe into slots `view.slots` of layer `view.layer`.
        2. q_lat = q_nope . W_UK per head ([B,T,H,R]): keys are never expanded per head.
        3. Attend over the layer's cache up to each query's slot (`kernels.latent_attention`),
           giving latent values [B,C,T,H,R] in C slot chunks.
        4. Values per head = each chunk . W_UV, the chunks merged in fp32 ([B,T,H,Kv]), then
           o_proj. Merging after W_UV (it is linear) folds the merge into the sum that
           finishes that GEMM.
        """
        c = self.config
        B, T, _ = x.shape
        H, Kn, Kv = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
        q, latent, k_pe = self._project(x, cos, sin)
        q_nope, q_pe = q[..., :Kn], q[..., Kn:]
        with jax.named_scope("cache_write"):
            cache, rows = view.cache, jnp.arange(B)[:, None]
            cache = LatentCache(
                cache.latent.at[view.layer, rows, view.slots].set(latent.astype(cache.latent.dtype), mode="drop"),
                cache.k_pe.at[view.layer, rows, view.slots].set(k_pe.astype(cache.k_pe.dtype), mode="drop"))
        w_kv_b = self._kv_b_heads()
        with jax.named_scope("absorb_q"):
            q_lat = einsum("bthk,rhk->bthr", q_nope, w_kv_b[..., :Kn], dtype=x.dtype)  # W_UK
        with jax.named_scope("core"):
            o_lat, lse = latent_attention(q_lat, q_pe.astype(x.dtype), cache.latent, cache.k_pe, view.layer,
                                          view.slots, c.softmax_scale)  # [B,C,T,H,R], [B,C,T,H]
        with jax.named_scope("absorb_o"):
            o = einsum_f32("bcthr,rhk->bcthk", o_lat, w_kv_b[..., Kn:], dtype=x.dtype)  # W_UV
            o = merge_chunks(o, lse).astype(x.dtype)
        return self.o_proj(o.reshape(B, T, H * Kv)), cache
