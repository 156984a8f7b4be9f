"""Varying-axes types for kernels inside `shard_map`.

Under `shard_map` every array is typed with the manual mesh axes it varies over. tokamax's
kernels (0.0.17) return arrays typed as replicated whatever their inputs, which breaks the
types of outputs and gradients; these helpers re-type a kernel's results like its inputs.
Outside `shard_map` they are no-ops.
"""

from __future__ import annotations

import jax


def varying(a: jax.Array) -> frozenset:
    """The manual mesh axes `a` is typed as varying over (`vma` before jax 0.10)."""
    t = jax.typeof(a)
    mat = getattr(t, "manual_axis_type", None)
    return mat.varying if mat is not None else frozenset(getattr(t, "vma", ()))


def as_varying(a: jax.Array, axes: frozenset) -> jax.Array:
    """`a` typed as varying over `axes` too."""
    missing = axes - varying(a)
    return jax.lax.pcast(a, tuple(sorted(missing)), to="varying") if missing else a


def vary_like(out: jax.Array, *inputs: jax.Array) -> jax.Array:
    """`out` typed as varying over every manual mesh axis its inputs vary over."""
    return as_varying(out, frozenset().union(*map(varying, inputs)))


def cotangent_like(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """A kernel's cotangent typed like its primal: summed over the axes the primal does not vary
    over (the transpose of an implicit broadcast, e.g. weights replicated over the token axes),
    re-typed as varying over those it does."""
    extra = varying(ct) - varying(primal)
    ct = jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct
    return as_varying(ct, varying(primal))


def struct_like(shape, dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """An output type for pallas_call varying over the same manual mesh axes as `like`."""
    t = jax.typeof(like)
    if hasattr(t, "manual_axis_type"):
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=t.manual_axis_type)
    return jax.ShapeDtypeStruct(shape, dtype, vma=t.vma)
