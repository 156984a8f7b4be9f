"""An elementwise update of a layer stack's arrays, one layer at a time and in place: the
optimizer's pass over a stacked weight, its moments and its master rest.

A stacked weight's gradient is its unrolled layers' gradients, each written by its own layer's
backward; read as one [L, ...] array they are joined, and XLA's fusion reading through an
L-way join spends its arithmetic choosing the operand of every element. AdamW with master
weights over an [11, 64, 2048, 2048] stack (H200): 15.8 ms read through the join, 13.1 from a
gradient already in one array, 13.2 a layer at a time here (4.0 TB/s: 18 bytes a weight).

Two implementations of the same op (`IMPLS`):
- "xla": one XLA fusion over the whole stack (everywhere; the default off GPU, under a
  multi-device mesh, where the SPMD partitioner cannot split a Pallas call, for a stack of 2^31
  or more elements, beyond the kernel's int32 offsets, and for layers under `MIN_LAYER`
  elements, whose kernels would take their launch's time: XLA fuses such updates together);
- "pallas": a Pallas (Triton) kernel a layer that reads that layer's gradient where its backward
  wrote it (XLA resolves the slice of the join) and writes the layer's part of each stacked
  array in place (aliased); on CPU it runs in interpret mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsv3_jax.kernels.choice import forced, one_device

IMPLS = ("xla", "pallas")
BLOCK, NUM_WARPS = 1024, 4  # elements a program (H200 sweep: 1024-4096 elements, 4-8 warps alike)
MIN_LAYER = 2 ** 18  # elements a layer below which "auto" takes "xla"

Update = Callable[[Sequence[jax.Array], jax.Array, Sequence[jax.Array]], Sequence[jax.Array]]


def default_impl(shape: tuple[int, ...]) -> str:
    """The impl `kernels.use` forces, else for a stack of `shape` ([L, ...]) "pallas" on one GPU
    if it has fewer than 2^31 elements and its layers at least `MIN_LAYER`, and "xla" elsewhere."""
    if forced("layer_update"):
        return forced("layer_update")
    size = math.prod(shape)
    gpu = jax.default_backend() == "gpu" and one_device()
    return "pallas" if gpu and size < 2 ** 31 and size >= MIN_LAYER * shape[0] else "xla"


def update_layers(fn: Update, arrays: Sequence[jax.Array], grad: jax.Array, scalars: Sequence[jax.Array],
                  impl: str | None = None) -> tuple[jax.Array, ...]:
    """arrays [L, ...] each, grad [L, ...] (any dtypes), scalars: 0-d values ->
    fn(arrays, grad, scalars) (new arrays, elementwise, the same shapes; cast back to each
    array's dtype), computed one layer (index of axis 0) at a time by "pallas"."""
    impl = impl or default_impl(grad.shape)
    if impl not in IMPLS:
        raise ValueError(f"layer_update impl {impl!r}: choose from {IMPLS}")
    if impl == "xla":
        return tuple(new.astype(a.dtype) for new, a in zip(fn(arrays, grad, scalars), arrays))
    return _pallas(fn, tuple(arrays), grad, jnp.stack([jnp.asarray(s, jnp.float32) for s in scalars]))


def _pallas(fn: Update, arrays: tuple[jax.Array, ...], grad: jax.Array, scalars: jax.Array) -> tuple[jax.Array, ...]:
    L, n, k = grad.shape[0], math.prod(grad.shape[1:]), len(arrays)
    flat = tuple(a.reshape(L, n) for a in arrays)

    def kernel(layer, s_ref, *refs):
        ins, g_ref, outs = refs[:k], refs[k], refs[k + 1:]
        idx = pl.program_id(0) * BLOCK + jnp.arange(BLOCK)
        live = idx < n
        old = [plt.load(r.at[layer, idx], mask=live, other=0) for r in ins]
        g = plt.load(g_ref.at[idx], mask=live, other=0)
        for r, new in zip(outs, fn(old, g, [s_ref[j] for j in range(scalars.shape[0])])):
            plt.store(r.at[layer, idx], new.astype(r.dtype), mask=live)

    interpret = jax.default_backend() == "cpu"
    params = None if interpret else plt.CompilerParams(num_warps=NUM_WARPS, num_stages=1)
    for layer in range(L):
        flat = pl.pallas_call(
            lambda *refs, layer=layer: kernel(layer, *refs), grid=(pl.cdiv(n, BLOCK),),
            out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in flat],
            input_output_aliases={1 + i: i for i in range(k)}, interpret=interpret, compiler_params=params,
            name="layer_update",
        )(scalars, *flat, grad[layer].reshape(n))
    return tuple(a.reshape(b.shape) for a, b in zip(flat, arrays))
