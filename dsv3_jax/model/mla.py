"""Multi-head Latent Attention (SPEC B), training / prefill path.

Queries go through a low-rank bottleneck (or one projection when q_lora_rank is None); keys
and values are rebuilt per head from a shared latent c (kv_lora_rank) plus one rotary key
k_pe shared by all heads. Only q_pe and k_pe are rotated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels.attention import dot_product_attention
from dsv3_jax.model.layers import Linear, RMSNorm
from dsv3_jax.model.rope import apply_rope
from dsv3_jax.parallel.mesh import constrain

# The latent norms are built with RMSNorm's default eps in both references, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


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

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x [B,T,D], cos/sin [B,T,Kr/2], mask [B|1,1,T,T] -> [B,T,D]."""
        c = self.config
        B, T, _ = x.shape
        H, Kn, Kr, Kv = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        with jax.named_scope("q"):
            q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
            q = q.reshape(B, T, H, Kn + Kr)  # [B,T,H*K] -> [B,T,H,K]
            q_nope, q_pe = q[..., :Kn], apply_rope(q[..., Kn:], cos, sin)
        with jax.named_scope("kv"):
            kv_a = self.kv_a_proj(x)  # [B,T,R+Kr]
            latent = self.kv_a_norm(kv_a[..., : c.kv_lora_rank])  # [B,T,R]
            k_pe = apply_rope(kv_a[..., c.kv_lora_rank :], cos, sin)  # [B,T,Kr], shared by all heads
            kv = self.kv_b_proj(latent).reshape(B, T, H, Kn + Kv)  # [B,T,H*(Kn+Kv)] -> [B,T,H,Kn+Kv]
            k_nope, v = kv[..., :Kn], kv[..., Kn:]
        heads = ("batch", None, "act_heads", None)
        q = constrain(jnp.concatenate([q_nope, q_pe], axis=-1), *heads)  # [B,T,H,Kn+Kr]
        k = constrain(jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None, :], (B, T, H, Kr))], axis=-1),
                      *heads)
        v = constrain(v, *heads)
        with jax.named_scope("core"):
            o = constrain(dot_product_attention(q, k, v, mask, c.softmax_scale), *heads)  # [B,T,H,Kv]
        return self.o_proj(o.reshape(B, T, H * Kv))
