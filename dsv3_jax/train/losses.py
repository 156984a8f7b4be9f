"""Training losses: next-token and MTP cross-entropy in token chunks, and their targets."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsv3_jax.kernels import cross_entropy
from dsv3_jax.model.layers import einsum_f32


def chunked_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array, *,
                          chunk: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Mean -log softmax(h w)[target] over masked tokens, never forming all [N, V] logits.

    h [N,D], w [D,V] (the LM head), targets/mask [N] -> (mean loss, token count).
    Tokens are taken `chunk` at a time (chunk c holds tokens c, c + C, c + 2C, ..., so a
    batch-sharded N stays sharded inside each chunk); each chunk's [chunk, V] logits are fp32
    sums of `dtype` products rounded once to `dtype`, as the references' head returns them (HF
    then upcasts for the loss, as here; fp32 logits cost the bench step ~1 ms on an H200), and
    the softmax is fp32 (`kernels.cross_entropy`). When differentiated, the forward pass also
    forms both gradients from the same logits (softmax minus one-hot), so the backward pass only
    scales them: three GEMMs per chunk instead of four with a recomputed forward.
    """
    count = mask.sum()
    weight = mask.astype(jnp.float32) / jnp.maximum(count, 1)  # [N]: each token's share of the mean
    return _weighted_nll(h, w, targets.astype(jnp.int32), weight, min(chunk, h.shape[0]), jnp.dtype(dtype)), count


def _chunks(a: jax.Array, n_chunks: int) -> jax.Array:
    """[N, ...] -> [C, N/C, ...] with token n in chunk n % C (rows padded to a multiple of C)."""
    pad = -a.shape[0] % n_chunks
    a = jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))
    return a.reshape((-1, n_chunks) + a.shape[1:]).swapaxes(0, 1)


def _unchunk(a: jax.Array, n: int) -> jax.Array:
    return a.swapaxes(0, 1).reshape((-1,) + a.shape[2:])[:n]


def _chunk_nll(h, w, targets, dtype):
    """One chunk: logits [n,V] (rounded to `dtype`), their log-sum-exp [n] and -log p(target) [n]
    (fp32)."""
    logits = einsum_f32("nd,dv->nv", h, w, dtype=dtype, out_dtype=dtype)
    lse = cross_entropy.logsumexp(logits)
    return logits, lse, lse - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0].astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _weighted_nll(h, w, targets, weight, chunk: int, dtype):
    """sum_n weight[n] * -log softmax(h w)[n, targets[n]], chunk tokens at a time."""
    n_chunks = -(-h.shape[0] // chunk)

    def body(total, xs):
        h_c, t_c, wt_c = xs
        return total + (wt_c * _chunk_nll(h_c, w, t_c, dtype)[2]).sum(), None

    xs = (_chunks(h, n_chunks), _chunks(targets, n_chunks), _chunks(weight, n_chunks))
    return jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)[0]


def _weighted_nll_fwd(h, w, targets, weight, chunk, dtype):
    """The loss and its gradients dh [N,D], dw [D,V] (fp32) in one pass over the chunks. The
    first chunk's dw starts the sum, so no [D,V] of zeros is written and read (bench step on an
    H200: the loss's kernels 0.7 ms faster)."""
    n_chunks = -(-h.shape[0] // chunk)
    w_c = w.astype(dtype)

    def one(h_c, t_c, wt_c):
        logits, lse, nll = _chunk_nll(h_c, w_c, t_c, dtype)
        dlogits = cross_entropy.xent_grad(logits, lse, t_c, wt_c)
        dh = einsum_f32("nv,dv->nd", dlogits, w_c, dtype=dtype)
        return (wt_c * nll).sum(), einsum_f32("nd,nv->dv", h_c, dlogits, dtype=dtype), dh.astype(h.dtype)

    def body(carry, xs):
        total, dw, dh = one(*xs)
        return (carry[0] + total, carry[1] + dw), dh

    xs = (_chunks(h, n_chunks), _chunks(targets, n_chunks), _chunks(weight, n_chunks))
    total, dw, dh_first = one(*(a[0] for a in xs))
    (total, dw), dh = jax.lax.scan(body, (total, dw), tuple(a[1:] for a in xs))
    return total, (_unchunk(jnp.concatenate([dh_first[None], dh]), h.shape[0]), dw.astype(w.dtype))


def _weighted_nll_bwd(chunk, dtype, res, g):
    dh, dw = res
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None, None


_weighted_nll.defvjp(_weighted_nll_fwd, _weighted_nll_bwd)


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
