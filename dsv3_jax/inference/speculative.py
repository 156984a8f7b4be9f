"""MTP speculative decoding (SPEC D): the first MTP depth drafts one token, the main model
verifies it in the next step.

A round feeds [t_n, d] (the last emitted token and the draft for t_{n+1}) at slots n, n+1.
The draft is accepted with probability p(d) under the main model's distribution at slot n
(always, under greedy, exactly when d is the argmax); a rejected draft is replaced by a sample
from p with d removed. This is speculative sampling with a one-hot draft distribution, so the
output follows the main model's distribution exactly and greedy output equals plain greedy.
Accepted rounds emit t_{n+1} = d and t_{n+2}, sampled from slot n+1.

The MTP depth at slot i reads h_i (the main model's normed output) and Emb(t_{i+1}); it then
writes its own latent cache at the same slots as the main model, so it runs after the tokens
it needs are known, and its slot n+1 is rewritten next round when the draft was rejected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.inference.sampling import Sampling, sample
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.model.mla import CacheView, LatentCache
from dsv3_jax.model.rope import rope_cos_sin


def mtp_hidden(model: DeepSeekV3, h: jax.Array, ahead: jax.Array, positions: jax.Array, cache: LatentCache
               ) -> tuple[jax.Array, LatentCache]:
    """First MTP depth over slots `positions` [B,T]: h [B,T,D] main hidden, ahead [B,T] the token
    after each slot -> (its normed output [B,T,D] (the head's input: predicts t_{i+2}), cache)."""
    graphdef, state = nnx.split(model.mtp)
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))  # depth 0 of the stack
    cos, sin = rope_cos_sin(model.config, positions)
    with jax.named_scope("mtp_draft"):
        return block(h, model.embed(ahead), cos, sin, None, jnp.ones(positions.shape, bool),
                     cache=CacheView(cache, jnp.int32(0), positions))


def draft(model: DeepSeekV3, h: jax.Array, ahead: jax.Array, positions: jax.Array, cache: LatentCache,
          at: jax.Array) -> tuple[jax.Array, LatentCache]:
    """The MTP module's greedy guess [B] at the token two past slot `at` [B] (an index into T)."""
    hm, cache = mtp_hidden(model, h, ahead, positions, cache)
    picked = jnp.take_along_axis(hm, at[:, None, None], axis=1)[:, 0]  # [B,D]
    return jnp.argmax(model.lm_head(picked).astype(jnp.float32), -1).astype(jnp.int32), cache


def verify(probs: jax.Array, proposed: jax.Array, key: jax.Array, s: Sampling) -> tuple[jax.Array, jax.Array]:
    """probs [B,V] at the draft's slot, proposed [B] -> (accepted [B] bool, token [B] for that slot).

    Accept with probability probs[d]; otherwise sample from probs with d zeroed (the residual
    max(0, p - q) of speculative sampling when q is one-hot on d).
    """
    B = probs.shape[0]
    k_accept, k_resample = jax.random.split(key)
    p_draft = probs[jnp.arange(B), proposed]
    accepted = jax.random.uniform(k_accept, (B,)) < p_draft
    residual = probs.at[jnp.arange(B), proposed].set(0.0)
    return accepted, jnp.where(accepted, proposed, sample(k_resample, residual, s))
