"""Multi-token prediction module (SPEC D): depth k predicts the token k+1 places ahead.

h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])  (embedding first, as checkpoint
consumers concatenate), h^k = head_norm(TRM_k(h')), logits^k = head(h^k), with the embedding
and output head shared with the main model. h^0 is the main model's output after its final
norm, and each depth feeds its normed output to the next: the choices of HF transformers'
`MtpModel` and of the inference engines that serve the released weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers import Linear, RMSNorm


class MTPBlock(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        from dsv3_jax.model.transformer import DecoderLayer

        D, eps = config.hidden_size, config.rms_norm_eps
        norm = dict(eps=eps, dtype=dtype, param_dtype=param_dtype)
        self.enorm = RMSNorm(D, **norm)
        self.hnorm = RMSNorm(D, **norm)
        self.eh_proj = Linear(2 * D, D, std=config.initializer_range, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                              axes=(None, "embed"))
        self.layer = DecoderLayer(config, moe=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.head_norm = RMSNorm(D, **norm)

    def __call__(self, h: jax.Array, emb_ahead: jax.Array, cos, sin, starts, token_mask, cache=None):
        """h [B,T,D] (h^{k-1}), emb_ahead [B,T,D] (Emb(t_{i+k})) -> h^k, (h^k, stats); with a
        cache (`mla.CacheView`, the decode path) -> h^k, the updated cache."""
        x = self.eh_proj(jnp.concatenate([self.enorm(emb_ahead), self.hnorm(h)], axis=-1))  # [B,T,2D] -> [B,T,D]
        if cache is not None:
            h, _, cache = self.layer(x, cos, sin, starts, token_mask, cache=cache)
            return self.head_norm(h), cache
        h, stats = self.layer(x, cos, sin, starts, token_mask)
        h = self.head_norm(h)
        return h, (h, stats)
