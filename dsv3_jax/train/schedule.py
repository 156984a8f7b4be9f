"""DeepSeek-V3's schedules (SPEC G) as functions of the fraction of the run's tokens seen.

lr: linear warmup to the peak, constant, cosine down to min_lr_ratio * peak, then two
constant tails (min_lr_ratio, final_lr_ratio). MTP weight lambda: 0.3 then 0.1. Bias step
gamma: 0.001 then 0. Batch ramp: micro-batches per step grow linearly to grad_accum.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dsv3_jax.train.config import TrainConfig


def learning_rate(c: TrainConfig, frac):
    """frac = tokens seen / the run's planned tokens (a scalar, numpy or traced)."""
    warm = c.peak_lr * jnp.minimum(frac / c.warmup_fraction, 1.0) if c.warmup_fraction > 0 else c.peak_lr
    progress = jnp.clip((frac - c.constant_until) / (c.decay_until - c.constant_until), 0.0, 1.0)
    cosine = c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    lr = jnp.where(frac < c.constant_until, warm, c.peak_lr * cosine)
    lr = jnp.where(frac >= c.decay_until, c.peak_lr * c.min_lr_ratio, lr)
    return jnp.where(frac >= c.tail_until, c.peak_lr * c.final_lr_ratio, lr)


def mtp_lambda(c: TrainConfig, frac):
    return jnp.where(frac < c.mtp_lambda_until, c.mtp_lambda, c.mtp_lambda_late)


def bias_gamma(c: TrainConfig, frac):
    return jnp.where(frac < c.bias_gamma_until, c.bias_gamma, 0.0)


def accum_at(c: TrainConfig, step: int) -> int:
    """Micro-batches in step `step` (0-based): the batch-size ramp over ramp_fraction of the run."""
    if c.ramp_start_accum is None:
        return c.grad_accum
    ramp_steps = max(1, round(c.ramp_fraction * c.horizon))
    t = min(step / ramp_steps, 1.0)
    return int(np.floor(c.ramp_start_accum + t * (c.grad_accum - c.ramp_start_accum)))


def planned_micro_batches(c: TrainConfig) -> int:
    """Micro-batches in the whole planned run (the schedules' denominator)."""
    return sum(accum_at(c, s) for s in range(c.horizon))
