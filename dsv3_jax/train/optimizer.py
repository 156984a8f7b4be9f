"""AdamW (SPEC G) with gradient clipping, optional BF16 moments, master weights, and a
documented decay mask, as one elementwise pass a weight.

The clipped gradient, both moments, the bias-corrected direction, decoupled weight decay, the
learning rate (the train step's: it depends on tokens seen, which the batch ramp makes
non-linear in steps), the master weight's join and split, and the keep-or-skip of a
non-finite step are one function of a weight's elements (`_adamw`), so one pass reads and
writes each weight once, a layer of a layer stack at a time (`kernels.layer_update`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv3_jax.kernels import layer_update
from dsv3_jax.train.config import TrainConfig


class AdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def global_norm(tree) -> jax.Array:
    """sqrt of the sum of squares of every leaf, in fp32 (the step's grad_norm, which clips the
    update). A layer stack's leaf is summed one layer at a time (`layers`): its gradient is the
    unrolled layers' gradients joined, and a sum read through that join ran at half the HBM rate
    (H200, 11 x [64,2048,1024] bf16: 1.44 against 0.71 ms a layer at a time)."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for v in leaves for x in layers(v)))


def layers(v, x: jax.Array | None = None) -> jax.Array:
    """x (default: v's value) as [L, ...]: for a layer stack's Variable its dims beyond its
    `logical_axes` flattened into L; anything else as one layer."""
    value = v[...] if isinstance(v, nnx.Variable) else v
    axes = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
    x = value if x is None else x
    return x.reshape((-1,) + x.shape[value.ndim - len(axes or value.shape):])


def master_parts(m: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """A float32 master weight -> (the param: m in `dtype`; the rest, int16), so that
    `master_weight` gives m back bit for bit (a NaN as a NaN). A bfloat16 param is m's high 16
    bits rounded to nearest (ties away from zero, where the cast rounds ties to even: one value
    in 65,536), and the rest is m's bits minus the param's, which fits 16 signed bits. A float32
    param is m itself (rest 0)."""
    if jnp.dtype(dtype) == jnp.float32:
        return m, jnp.zeros(m.shape, jnp.int16)
    bits = jax.lax.bitcast_convert_type(m, jnp.uint32)
    high = (bits + 0x8000) >> 16  # sign-magnitude: a carry is away from zero
    param = jax.lax.bitcast_convert_type(high.astype(jnp.uint16), jnp.bfloat16)
    rest = jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.int16)  # bits - (high << 16)
    return jnp.where(jnp.isnan(m), jnp.bfloat16(jnp.nan), param), rest  # a NaN's carry could leave it


def master_weight(param: jax.Array, rest: jax.Array) -> jax.Array:
    """The float32 master weight of (param, rest) from `master_parts`."""
    if param.dtype == jnp.float32:
        return param
    high = jax.lax.bitcast_convert_type(param, jnp.uint16).astype(jnp.uint32) << 16
    return jax.lax.bitcast_convert_type(high + rest.astype(jnp.int32).astype(jnp.uint32), jnp.float32)


def decay_mask(params):
    """Weight decay on every weight matrix (projections, experts, embedding, head, router);
    not on RMSNorm scales, whose natural value is 1, not 0."""
    is_scale = lambda path: any(getattr(k, "key", getattr(k, "name", None)) == "scale" for k in path)
    return jax.tree_util.tree_map_with_path(lambda path, _: not is_scale(path), params)


class Optimizer(NamedTuple):
    """`init(weights) -> opt_state`: zero moments in `moments_dtype` (the state keeps
    optax.chain(clip, adam, decay)'s layout, (EmptyState, AdamState, EmptyState), so that
    earlier checkpoints restore). `update(params, rest, opt_state, grads, *, norm, mean_of, lr,
    ok) -> (params, rest, opt_state)`: one AdamW step from gradients summed over `mean_of`
    micro-batches whose mean has global norm `norm`; `rest` is the master weights' (None
    without); where `ok` is false every array keeps its value."""
    init: Callable
    update: Callable


def make_optimizer(c: TrainConfig) -> Optimizer:
    b1, b2, eps, wd, moments = c.adam_b1, c.adam_b2, c.adam_eps, c.weight_decay, jnp.dtype(c.moments_dtype)

    def init(weights):
        zeros = lambda p: jnp.zeros(p.shape, moments)
        adam = AdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, weights), jax.tree.map(zeros, weights))
        return optax.EmptyState(), adam, optax.EmptyState()

    def update(params, rest, opt_state, grads, *, norm, mean_of, lr, ok):
        _, adam, _ = opt_state
        t = (adam.count + 1).astype(jnp.float32)
        clip = jnp.where(norm < c.clip_norm, 1.0, c.clip_norm / norm)
        scalars = (clip / mean_of, lr, 1 / (1 - b1 ** t), 1 / (1 - b2 ** t), ok.astype(jnp.float32))
        variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
        p, treedef = jax.tree.flatten(params)
        r = [None] * len(p) if rest is None else jax.tree.leaves(rest)
        m, v, g, decay = (jax.tree.leaves(t) for t in (adam.mu, adam.nu, grads, decay_mask(params)))
        assert len(variables) == len(p) == len(r) == len(m) == len(v) == len(g) == len(decay)
        new = [_update_leaf(*leaf, scalars, b1=b1, b2=b2, eps=eps, wd=wd if d else 0.0)
               for *leaf, d in zip(variables, p, r, m, v, g, decay)]
        p, r, m, v = (jax.tree.unflatten(treedef, parts) for parts in zip(*new))
        count = adam.count + ok.astype(jnp.int32)
        return p, None if rest is None else r, (opt_state[0], AdamState(count, m, v), opt_state[2])

    return Optimizer(init, update)


def _update_leaf(variable, p, r, m, v, g, scalars, **hyper) -> tuple:
    """One weight's (param, rest or None, m, v) after `_adamw`, a layer at a time (a weight
    outside a layer stack is one layer)."""
    arrays = (p, m, v) if r is None else (p, r, m, v)
    new = layer_update.update_layers(lambda arrays, g, s: _adamw(arrays, g, s, **hyper),
                                     [layers(variable, a) for a in arrays], layers(variable, g), scalars)
    new = tuple(x.reshape(a.shape) for x, a in zip(new, arrays))
    return (new[0], None, *new[1:]) if r is None else new


def _adamw(arrays, g, scalars, *, b1, b2, eps, wd):
    """The elements of (param, [rest,] m, v) and their gradient sum -> their new values, each in
    its array's dtype (param and rest split from the float32 master; m and v computed in fp32).
    scalars: the gradient's factor (clipping / micro-batches), the learning rate, Adam's two
    bias corrections (reciprocals: a division an element, not three), and ok (1.0 or 0.0)."""
    factor, lr, r1, r2, ok = scalars
    p, *r, m, v = arrays
    w = master_weight(p, *r) if r else p.astype(jnp.float32)
    g = g.astype(jnp.float32) * factor
    mu = b1 * m.astype(jnp.float32) + (1 - b1) * g
    nu = b2 * v.astype(jnp.float32) + (1 - b2) * g * g
    step = mu * r1 / (jnp.sqrt(nu * r2) + eps)
    w = w - lr * (step + wd * w if wd else step)
    new = (*master_parts(w, p.dtype), mu, nu) if r else (w, mu, nu)
    return tuple(jnp.where(ok > 0, x.astype(a.dtype), a) for x, a in zip(new, arrays))
