"""Training losses: next-token and MTP cross-entropy in vocabulary chunks, and their targets."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.model.layers import einsum


def chunked_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array, *,
                          chunk: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Mean -log softmax(h w)[target] over masked tokens, never forming [N, V] logits.

    h [N,D], w [D,V] (the LM head), targets/mask [N] -> (mean loss, token count).
    The vocabulary is scanned in `chunk`-wide slices with an online logsumexp; each slice is
    rematerialised in the backward pass, so memory is O(N * chunk) both ways.
    """
    N, (D, V) = h.shape[0], w.shape
    chunk = min(chunk, V)
    n_chunks = -(-V // chunk)
    w = jnp.pad(w, ((0, 0), (0, n_chunks * chunk - V))).reshape(D, n_chunks, chunk).transpose(1, 0, 2)  # [C,D,Vc]

    @jax.checkpoint
    def body(carry, xs):
        m, s, t = carry  # running max, sum of exp(logit - m), target logit: [N] each
        w_c, c = xs
        logits = einsum("nd,dv->nv", h, w_c, dtype=dtype).astype(jnp.float32)  # [N,Vc]
        col = c * chunk + jnp.arange(chunk)
        logits = jnp.where(col[None, :] < V, logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(-1)
        hit = col[None, :] == targets[:, None]
        t = t + jnp.where(hit, logits, 0.0).sum(-1)
        return (m_new, s, t), None

    init = (jnp.full((N,), -jnp.inf, jnp.float32), jnp.zeros((N,), jnp.float32), jnp.zeros((N,), jnp.float32))
    (m, s, t), _ = jax.lax.scan(body, init, (w, jnp.arange(n_chunks)))
    nll = m + jnp.log(s) - t
    count = mask.sum()
    return jnp.where(mask, nll, 0.0).sum() / jnp.maximum(count, 1), count


def shifted_targets(tokens: jax.Array, segment_ids: jax.Array, shift: int, same_document: bool
                    ) -> tuple[jax.Array, jax.Array]:
    """Targets t_{i+shift} [B,T] and where they count: t_{i+shift} exists, neither it nor t_i
    is padding (segment 0), and, with same_document, both lie in the same document."""
    T = tokens.shape[1]
    targets = jnp.roll(tokens, -shift, axis=1)
    ahead = jnp.roll(segment_ids, -shift, axis=1)
    valid = (jnp.arange(T) < T - shift)[None, :] & (segment_ids != 0) & (ahead != 0)
    if same_document:
        valid &= ahead == segment_ids
    return targets, valid
