"""Shared pieces for the parallel tests: the tiny fp32 model, a batch, and a loss over every output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3

CONFIG = ModelConfig.preset("tiny")
F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)
B, T = 8, 16


def tokens(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (B, T), dtype=np.int32)


def reference_model(seed: int = 0) -> DeepSeekV3:
    """The unsharded model, built eagerly by its own constructor."""
    return DeepSeekV3(CONFIG, rngs=nnx.Rngs(seed), **F32)


def _ce(logits, targets, mask):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return (nll * mask).sum() / mask.sum()


def loss_fn(model: DeepSeekV3, toks: jax.Array):
    """Next-token CE + MTP CE + balance loss; (loss, (logits, expert_load))."""
    out = model(toks)
    Tn = toks.shape[1]
    mask = (jnp.arange(Tn) < Tn - 1).astype(jnp.float32)[None]
    loss = _ce(out.logits, jnp.roll(toks, -1, 1), mask)
    mask2 = (jnp.arange(Tn) < Tn - 2).astype(jnp.float32)[None]
    loss = loss + 0.3 * _ce(out.mtp_logits[0], jnp.roll(toks, -2, 1), mask2) + 0.01 * out.balance_loss
    return loss, (out.logits, out.expert_load)


def loss_and_grads(model: DeepSeekV3, toks: jax.Array):
    """Jitted (loss, logits, expert_load, grads of the nnx.Param leaves as a pure dict)."""

    @nnx.jit
    def step(model, toks):
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
        (loss, (logits, load)), grads = grad_fn(model, toks)
        return loss, logits, load, grads

    loss, logits, load, grads = step(model, toks)
    return loss, logits, load, nnx.to_pure_dict(grads)
