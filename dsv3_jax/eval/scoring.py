"""Log-likelihood scoring: bits per byte with a sliding window, and multiple choice.

Both run the plain (uncached) forward over fixed-shape batches [batch, window], so one compile
serves a whole evaluation. With a `mesh` (the one the model's parameters are sharded over) the
batch rows are split over its batch axes and the MoE runs expert-parallel, as in `generate`
(over several processes, each passes the same tokens and gets every score).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.model import DeepSeekV3
from dsv3_jax.parallel.mesh import batch_sharding, fetch, padded_rows, place

_JITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_logprobs(model: DeepSeekV3, tokens: np.ndarray, mesh=None) -> np.ndarray:
    """tokens [B,T] -> [B,T-1] fp32: log p(tokens[:, t+1] | tokens[:, :t+1]); B splits over
    `mesh`'s batch axes (module docstring)."""
    if model not in _JITTED:
        graphdef = nnx.graphdef(model)

        @jax.jit
        def run(state, tokens):
            logits = nnx.merge(graphdef, state)(tokens).logits.astype(jnp.float32)  # [B,T,V]
            logp = jax.nn.log_softmax(logits[:, :-1], -1)
            return jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]

        _JITTED[model] = run
    tokens = np.asarray(tokens, np.int32)
    tokens = jnp.asarray(tokens) if mesh is None else place(tokens, batch_sharding(mesh))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return fetch(_JITTED[model](nnx.state(model), tokens))


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) per window over n tokens: tokens 1..n-1 are each scored once,
    the first window's from its start, later ones' (the last `stride` of each window) with
    window - stride or more tokens of context (HF's sliding-window perplexity recipe)."""
    if window < 2:
        raise ValueError(f"window={window}: must be >= 2 (one token of context, one scored)")
    if not 0 < stride < window:
        raise ValueError(f"stride={stride} must be in (0, window={window})")
    end = min(window, n)
    out = [(0, end, 1)]
    while end < n:
        new_end = min(end + stride, n)
        out.append((new_end - window, new_end, end))
        end = new_end
    return out


def bits_per_byte(model: DeepSeekV3, tokens: Sequence[int], n_bytes: int, *, window: int = 512,
                  stride: int | None = None, batch: int = 8, mesh=None) -> dict:
    """Bits per byte of a token sequence that encodes `n_bytes` bytes of text.

    sum over scored tokens of -log2 p(token | up to window-1 earlier tokens) / n_bytes; the
    first token is context only (put BOS first to score the text's first token).
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.size < 2:
        raise ValueError(f"need at least 2 tokens to score, got {tokens.size}")
    if n_bytes <= 0:
        raise ValueError(f"n_bytes={n_bytes}: must be > 0")
    window, batch = min(window, model.config.max_position_embeddings), padded_rows(batch, mesh)
    spans = windows(tokens.size, window, window // 2 if stride is None else stride)
    nll = 0.0
    for i in range(0, len(spans), batch):
        chunk = spans[i: i + batch]
        rows = np.zeros((batch, window), np.int32)
        for r, (b, e, _) in enumerate(chunk):
            rows[r, : e - b] = tokens[b:e]
        logp = token_logprobs(model, rows, mesh)
        for r, (b, e, s) in enumerate(chunk):
            nll -= float(logp[r, s - b - 1: e - b - 1].astype(np.float64).sum())
    scored = tokens.size - 1
    return {"bits_per_byte": nll / math.log(2) / n_bytes, "tokens": int(tokens.size), "bytes": n_bytes,
            "nats_per_token": nll / scored, "windows": len(spans)}


def choice_scores(model: DeepSeekV3, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                  *, batch: int = 8, mesh=None) -> np.ndarray:
    """Summed log-likelihood of each continuation after its context -> [N] fp64."""
    seqs = [list(c) + list(x) for c, x in zip(contexts, continuations)]
    if any(len(c) == 0 or len(x) == 0 for c, x in zip(contexts, continuations)):
        raise ValueError("every context and continuation needs at least one token")
    longest, max_pos = max(len(s) for s in seqs), model.config.max_position_embeddings
    if longest > max_pos:
        raise ValueError(f"a prompt of {longest} tokens exceeds max_position_embeddings={max_pos}")
    length = min(max(16, 1 << (longest - 1).bit_length()), max_pos)  # padded to a power of two, within the model
    batch = padded_rows(batch, mesh)
    out = np.zeros(len(seqs))
    for i in range(0, len(seqs), batch):
        rows = np.zeros((batch, length), np.int32)
        for r, s in enumerate(seqs[i: i + batch]):
            rows[r, : len(s)] = s
        logp = token_logprobs(model, rows, mesh).astype(np.float64)
        for r in range(min(batch, len(seqs) - i)):
            c, x = len(contexts[i + r]), len(continuations[i + r])
            out[i + r] = logp[r, c - 1: c - 1 + x].sum()
    return out
