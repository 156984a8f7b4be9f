"""Causal self-attention core softmax(q k^T * scale + mask) v, with q/k head dim != v head dim
(MLA: 192/128), optionally within packed documents.

The mask is never an input array: query t attends keys s with starts[t] <= s <= t, where
starts[t] is the first token of t's document (`document_starts`), so a kernel forms it from
indices and skips the key blocks before a document instead of reading a [B,T,T] mask.

Four implementations of the same op, each taking v's head dim as it is:
- "xla": plain einsums, fp32 softmax; every backend.
- "tokamax": tokamax's Mosaic GPU flash attention; the GPU default where "hopper" and "cudnn"
  are not: for packed documents (its per-query key start skips the blocks before a document),
  under a multi-device mesh (where it was measured, on 2 H200s; the others were not), and on
  other GPUs.
- "hopper": tokamax's forward, then our Mosaic GPU backward (`kernels.attention_backward`):
  plain causal only, the shapes its kernels take; the default for those on one Hopper GPU.
  Forward + backward at the bench layer (B4 T4096 H16, 192/128, an H200): cuDNN's forward and
  this backward 2.42 ms against 2.94 with cuDNN's backward.
- "cudnn": tokamax's forward, then cuDNN's flash attention backward (cuDNN's own forward where
  tokamax does not run); plain causal only, bf16/fp16, cuDNN >= 9.10; the default on one Hopper
  GPU for what "hopper" does not take. Not bitwise reproducible run to run unless XLA asks cuDNN
  for the deterministic algorithm (`--xla_gpu_deterministic_ops=true`).
Both backward passes read the forward's output and its softmax statistics, the log-sum-exp of
the scaled scores [B,H,T], which tokamax's forward returns as row maxima m and sums l: m + log(l).

Under a mesh whose every axis splits the batch or the heads, the op runs per device inside
`shard_map` on its own rows and heads: the SPMD partitioner cannot split tokamax's kernels,
and left to it the backward pass gathered the whole batch onto every device (measured on
2 H200s at expert=2).
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp

from dsv3_jax.kernels import attention_backward
from dsv3_jax.kernels.choice import forced, one_device
from dsv3_jax.parallel.mesh import activation_spec

IMPLS = ("xla", "tokamax", "hopper", "cudnn")


def default_impl(q: jax.Array | None = None, v: jax.Array | None = None, starts: jax.Array | None = None) -> str:
    """The impl `kernels.use` forces, else, for plain causal attention (q and v given, no
    starts) on one device: hopper where its kernels take the call and run here, else cudnn where
    it takes the call and runs here; else tokamax on a GPU its Mosaic kernels run on (Ampere
    and newer) where installed, else xla."""
    if forced("attention"):
        return forced("attention")
    plain = q is not None and starts is None and one_device()
    if plain and attention_backward.takes(q, v) and _hopper_runs_here():
        return "hopper"
    if plain and cudnn_takes(q, v) and _cudnn_runs_here():
        return "cudnn"
    return "tokamax" if _tokamax_runs_here() else "xla"


def cudnn_takes(q: jax.Array, v: jax.Array) -> bool:
    """Whether cuDNN's kernel takes plain causal attention of these: bf16 or fp16, head dims
    multiples of 8 up to 256."""
    dims_ok = all(d % 8 == 0 and d <= 256 for d in (q.shape[-1], v.shape[-1]))
    return q.dtype in (jnp.bfloat16, jnp.float16) and dims_ok


@functools.cache
def _hopper_runs_here() -> bool:
    """A Hopper GPU (wgmma) with tokamax's forward."""
    return _tokamax_runs_here() and jax.devices()[0].compute_capability == "9.0"


@functools.cache
def _cudnn_runs_here() -> bool:
    """A Hopper GPU (where it was measured) with cuDNN >= 9.10 (v's head dim != q's)."""
    if jax.default_backend() != "gpu":
        return False
    from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

    try:
        version = check_cudnn_version()
    except RuntimeError:  # no cuDNN (a ROCm build)
        return False
    return version >= 91000 and jax.devices()[0].compute_capability == "9.0"


@functools.cache
def _tokamax_runs_here() -> bool:
    """tokamax installed and its Mosaic GPU kernels supported by this process's GPU (asked once,
    not at every attention call being traced)."""
    if jax.default_backend() != "gpu" or importlib.util.find_spec("tokamax") is None:
        return False
    from tokamax._src.ops.attention.pallas_mosaic_gpu import PallasMosaicGpuFlashAttention

    return PallasMosaicGpuFlashAttention().supported_on(jax.devices()[0])


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """segment_ids [B,T] -> [B,T] int32: the index of the first token of each token's segment, a
    contiguous run of equal ids (how packing lays documents out)."""
    B, T = segment_ids.shape
    new = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(new, jnp.arange(T, dtype=jnp.int32), 0), axis=1)


def dot_product_attention(q: jax.Array, k: jax.Array | tuple[jax.Array, ...], v: jax.Array,
                          starts: jax.Array | None, scale: float, impl: str | None = None) -> jax.Array:
    """q [B,T,H,K], k [B,T,H,K] or its columns in parts (a tuple of [B,T,H,w], joined along the
    last axis: MLA's k_nope and its broadcast k_pe), v [B,T,H,Kv], starts [B,T] int
    (`document_starts`; None: every query's document starts at 0) -> [B,T,H,Kv].

    Scores accumulate in fp32 and the softmax runs in fp32; the probabilities are rounded to
    the compute dtype before the value product (as HF and the official code do). Given k in
    parts, "hopper" writes each part's gradient on its own, so none is sliced out of a whole.
    """
    impl = impl or default_impl(q, v, starts)
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r}: choose from {IMPLS}")
    if impl != "hopper" and isinstance(k, tuple):
        k = jnp.concatenate(k, axis=-1)
    fn = functools.partial({"xla": _xla, "tokamax": _tokamax, "hopper": _hopper, "cudnn": _cudnn}[impl], scale=scale)
    heads = activation_spec("batch", None, "act_heads", None, shape=q.shape)
    if heads is None or _split_axes(heads) != _split_axes(jax.sharding.get_abstract_mesh()):
        return fn(q, k, v, starts)  # no mesh, or not split over every axis: left to the partitioner
    starts_spec = None if starts is None else activation_spec("batch", None, shape=starts.shape)
    k_spec = tuple(heads for _ in k) if isinstance(k, tuple) else heads
    # every device computes only its own slice (no collectives, nothing replicated), so the
    # varying-axes check, which tokamax's Mosaic kernels do not support, is not needed
    return jax.shard_map(fn, in_specs=(heads, k_spec, heads, starts_spec), out_specs=heads,
                         check_vma=False)(q, k, v, starts)


def _split_axes(x) -> set[str]:
    """Mesh axes of size > 1 (of a mesh), or those a PartitionSpec splits over."""
    if isinstance(x, jax.sharding.PartitionSpec):
        return {a for part in x if part for a in ((part,) if isinstance(part, str) else part)}
    return {a for a, n in x.shape.items() if n > 1}


def _tokamax(q, k, v, starts, scale, residuals: bool = False):
    """tokamax's Mosaic GPU flash attention, document starts as its per-query k_start: a mask
    form its public function does not take yet, hence the private modules (tokamax.ops.gpu
    would also import its Triton kernels, which need jax_triton). With `residuals`, also its
    softmax row maxima and sums, each [B,H,T]."""
    from tokamax._src.ops.attention.base import Mask
    from tokamax._src.ops.attention.pallas_mosaic_gpu import PallasMosaicGpuFlashAttention

    mask = Mask(is_causal=True, k_start=None if starts is None else starts[:, None, :])  # [B,1,T]
    return PallasMosaicGpuFlashAttention()(q, k, v, mask=mask, logits_scale=scale, return_residuals=residuals)


def _hopper(q, k, v, starts, scale):
    """tokamax's causal attention, differentiated by `attention_backward` (k whole or in parts)."""
    if starts is not None:
        raise ValueError("attention impl 'hopper' takes no packed documents: use 'tokamax' or 'xla' "
                         "for train.mask_documents=true")
    if not _hopper_runs_here():
        raise ValueError("attention impl 'hopper' needs a Hopper GPU and tokamax (requirements-gpu.txt) for its "
                         "forward: use 'tokamax', 'cudnn' or 'xla' here")
    if not attention_backward.takes(q, v):
        raise ValueError(f"attention impl 'hopper' takes bf16/fp16 q {q.shape} and v {v.shape} with T a multiple "
                         "of 128 and head dims multiples of 64 summing to at most 320: use 'cudnn' or 'tokamax'")
    return _tokamax_then(q, *_parts(k), v, scale, "hopper")


def _cudnn(q, k, v, starts, scale):
    """cuDNN's flash attention backward (Hopper, cuDNN >= 9.10 for v's head dim != q's; jax.nn's
    wrapper still requires equal head dims, hence the private module) after tokamax's forward
    where tokamax runs, else cuDNN's: causal only."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    if starts is not None:
        raise ValueError("attention impl 'cudnn' takes no packed documents: use 'tokamax' or 'xla' "
                         "for train.mask_documents=true")
    if _tokamax_runs_here():
        return _tokamax_then(q, *_parts(k), v, scale, "cudnn")
    return cudnn_attention(q, k, v, scale=scale, mask_type=MaskType.CAUSAL)


def _parts(k) -> tuple[tuple[jax.Array, ...], tuple[int, ...]]:
    """k whole or in parts -> its parts and their head dims (static, for the backward pass)."""
    parts = k if isinstance(k, tuple) else (k,)
    return parts, tuple(p.shape[-1] for p in parts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 4, 5))
def _tokamax_then(q, k_parts, widths, v, scale, backward):
    """tokamax's causal attention (k's parts joined; `widths` their head dims), differentiated
    by `backward`: "hopper" (a gradient for each part) or "cudnn" (one part)."""
    return _tokamax(q, jnp.concatenate(k_parts, axis=-1), v, None, scale)


def _tokamax_then_fwd(q, k_parts, widths, v, scale, backward):
    """Saves the output and the log-sum-exp of the scaled scores [B,H,T], from tokamax's row
    maxima and sums."""
    k = jnp.concatenate(k_parts, axis=-1)
    out, (row_max, row_sum) = _tokamax(q, k, v, None, scale, residuals=True)
    return out, (q, k, v, out, row_max + jnp.log(row_sum))


def _tokamax_then_bwd(widths, scale, backward, res, g):
    """Our kernels, or cuDNN's backward rule fed the residuals its own forward would have saved
    (q, k, v, seven unused inputs, the statistics, the output)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    q, k, v, out, lse = res
    if backward == "hopper":
        return attention_backward.backward(q, k, v, out, lse, g, scale, widths)
    unused = jnp.zeros((0,), q.dtype)
    saved = (q, k, v, *(unused,) * 7, lse, out)
    dq, dk, dv = cudnn._dot_product_attention_bwd_rule(
        scale, 0, 0.0, (False, False), cudnn.MaskType.CAUSAL, cudnn.AttentionLayout.BTNH.value, None,
        cudnn.check_cudnn_version(), False, saved, g)[:3]
    return dq, (dk,), dv


_tokamax_then.defvjp(_tokamax_then_fwd, _tokamax_then_bwd)


def _xla(q, k, v, starts, scale):
    t = jnp.arange(q.shape[1])
    mask = (t[:, None] >= t[None, :])[None]  # [1,T,S]
    if starts is not None:
        mask = mask & (t[None, None, :] >= starts[:, :, None])  # [B,T,S]
    mask = mask[:, None]  # [B|1,1,T,S]
    scores = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bhts,bshk->bthk", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
