"""Absorbed MLA attention against the latent cache (SPEC B, absorb mode): the decode core.

For query rows q = (q_lat [R], q_pe [Kr]) at cache slot p and one layer of the stacked cache
(latent [S,R], k_pe [S,Kr]), out = softmax((q_lat . latent_s + q_pe . k_pe_s) * scale over
s <= p) . latent, in fp32, returned in the compute dtype.

The result comes in C slot chunks, flash-decoding style: each chunk's attention normalised over
its own slots, and its log-sum-exp of scores. `merge_chunks` weighs them into the attention over
all slots. The merge is linear in the chunks, so callers may first apply a linear map to each
chunk: MLA's decode step applies W_UV to the chunks and merges after it, not in kernels of
their own before it (one kernel fewer a layer; the bench decode step on an H200 gained 0.3-2%,
docs/benchmarks.md).

Two implementations of the same op:
- "xla": the layer's cache sliced out, scores for every slot, a masked fp32 softmax and the
  value product as einsums, as one chunk (every backend; the prefill's form everywhere, whose
  many query tokens make it a pair of large matmuls).
- "pallas": one Pallas (Triton) kernel per layer for decode steps (a few query tokens per
  row). Program (b, m, j) takes 16-64 query rows (tokens x heads) of row b and slots
  [j C, (j+1) C) of the layer, read in place from the stacked cache (no per-layer copy) and
  only up to the last slot a query sees, with an online softmax. The probabilities meet the
  values unnormalised (the flash form), so in bf16 it rounds them differently from "xla"
  (both within bf16 of the fp32 result). GPU default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from jax.sharding import PartitionSpec

from dsv3_jax.kernels.choice import forced
from dsv3_jax.parallel.mesh import activation_spec, constrain

IMPLS = ("xla", "pallas")
MAX_PALLAS_TOKENS = 8  # query tokens per row up to which "auto" picks the kernel (decode, not prefill)
BLOCK_S = 64  # cache slots per kernel step
MIN_PROGRAMS = 128  # chunks per row are chosen to give at least this many programs (about one per H200 SM)
NUM_STAGES = 3  # Triton's software pipelining depth over the slot blocks (2 for 64-row query blocks: shared memory)
NUM_WARPS = 4  # per 32 query rows of a program
_NEG = -1e30  # the running max's start: finite, so a chunk a query sees nothing of adds exp(-inf) = 0


def default_impl(tokens: int, r: int, kr: int) -> str:
    """The impl `kernels.use` forces, else the kernel on GPU for decode steps (`tokens` query
    tokens per row) when it takes the head dims r, kr, else xla."""
    if forced("latent_attention"):
        return forced("latent_attention")
    gpu = jax.default_backend() == "gpu"
    return "pallas" if gpu and tokens <= MAX_PALLAS_TOKENS and _kernel_dims(r, kr) else "xla"


def _kernel_dims(*dims: int) -> bool:
    """Triton's blocks are powers of two, and its dot wants every side >= 16."""
    return all(d >= 16 and d & (d - 1) == 0 for d in dims)


def cache_mask(slots: jax.Array, size: int) -> jax.Array:
    """[B,1,T,S] True where cache slot s is visible from the query at slots[b,t] (s <= slot).

    Rows are filled left to right, so slots past a query hold nothing it may see (padding,
    rejected drafts) and are masked; they are overwritten when decoding reaches them.
    """
    return slots[:, None, :, None] >= jnp.arange(size, dtype=slots.dtype)[None, None, None, :]


def latent_attention(q_lat: jax.Array, q_pe: jax.Array, latent: jax.Array, k_pe: jax.Array, layer: jax.Array,
                     slots: jax.Array, scale: float, impl: str | None = None) -> tuple[jax.Array, jax.Array]:
    """q_lat [B,T,H,R], q_pe [B,T,H,Kr], the stacked cache latent [L,B,S,R] and k_pe [L,B,S,Kr],
    layer [] int, slots [B,T] (each query's own slot) -> (out [B,C,T,H,R] in q_lat's dtype,
    lse [B,C,T,H] fp32): C slot chunks, merged by `merge_chunks` (module docstring).

    Under a mesh the kernel runs per device on its rows (and heads) inside `shard_map`.
    """
    R, Kr = q_lat.shape[-1], q_pe.shape[-1]
    impl = impl or default_impl(q_lat.shape[1], R, Kr)
    if impl not in IMPLS:
        raise ValueError(f"latent attention impl {impl!r}: choose from {IMPLS}")
    if impl == "pallas" and not _kernel_dims(R, Kr):
        raise ValueError(f"the latent attention kernel needs kv_lora_rank ({R}) and qk_rope_head_dim ({Kr}) to be "
                         "powers of two >= 16; use impl 'xla'")
    if impl == "xla":
        return _xla(q_lat, q_pe, latent, k_pe, layer, slots, scale)
    fn = functools.partial(_pallas, scale=scale)
    q_spec = activation_spec("batch", None, "act_heads", None, shape=q_lat.shape)
    if q_spec is None:
        return fn(q_lat, q_pe, latent, k_pe, layer, slots)
    rows = activation_spec("batch", None, shape=slots.shape)
    cache_spec = PartitionSpec(None, rows[0], None, None)  # the cache's rows split like the queries' (inference.cache)
    out_spec = PartitionSpec(q_spec[0], None, *q_spec[1:])  # [B,C,T,H,R]
    lse_spec = PartitionSpec(*out_spec[:4])
    # rows and heads are independent: no collectives inside, so no varying-axes check (the
    # Triton lowering does not type its refs)
    return jax.shard_map(fn, in_specs=(q_spec, q_spec, cache_spec, cache_spec, PartitionSpec(), rows),
                         out_specs=(out_spec, lse_spec), check_vma=False)(q_lat, q_pe, latent, k_pe, layer, slots)


def merge_chunks(out: jax.Array, lse: jax.Array) -> jax.Array:
    """out [B,C,...,X] (chunks, or any linear map of them), lse [B,C,...] -> [B,...,X] fp32:
    the chunks weighted by their share of the softmax's denominator. One chunk is returned as is."""
    if out.shape[1] == 1:
        return out[:, 0].astype(jnp.float32)
    return (out.astype(jnp.float32) * jax.nn.softmax(lse, axis=1)[..., None]).sum(1)


def _xla(q_lat, q_pe, latent, k_pe, layer, slots, scale):
    """Scores for the layer's every slot, masked fp32 softmax, probabilities rounded to the compute
    dtype before the value product (as the training path's attention does); one chunk."""
    latent = constrain(latent[layer].astype(q_lat.dtype), "batch", None, None)  # [B,S,R]
    k_pe = constrain(k_pe[layer].astype(q_lat.dtype), "batch", None, None)  # [B,S,Kr]
    scores = (jnp.einsum("bthr,bsr->bhts", q_lat, latent, preferred_element_type=jnp.float32)
              + jnp.einsum("bthk,bsk->bhts", q_pe, k_pe, preferred_element_type=jnp.float32)) * scale
    scores = jnp.where(cache_mask(slots, latent.shape[1]), scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_lat.dtype)
    # [B,H,T,R] then transposed: a canonical batched matmul (XLA's CPU runtime has no BF16 x BF16
    # -> F32 kernel for the transposed layout that "bhts,bsr->bthr" lowers to at batch > 1)
    out = jnp.einsum("bhts,bsr->bhtr", probs, latent, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(scores, axis=-1).transpose(0, 2, 1)  # [B,T,H]
    return out.transpose(0, 2, 1, 3).astype(q_lat.dtype)[:, None], lse[:, None]


def _pallas(q_lat, q_pe, latent, k_pe, layer, slots, scale, interpret: bool = False):
    """The kernel (module docstring): query rows (t, h) flattened and padded to whole blocks
    (padding rows see no slot). A chunk a query sees nothing of comes out as zeros with a
    log-sum-exp of about -1e30: no weight in the merge."""
    B, T, H, R = q_lat.shape
    Kr, S = q_pe.shape[-1], latent.shape[2]
    M = T * H
    bm = min(64, max(16, 1 << (M - 1).bit_length()))  # query rows per program: a power of two >= 16
    n_m = -(-M // bm)
    rows = n_m * bm
    n_blocks = -(-S // BLOCK_S)
    n_chunks = min(n_blocks, max(1, -(-MIN_PROGRAMS // (B * n_m))))
    chunk = -(-n_blocks // n_chunks) * BLOCK_S  # slots per chunk
    n_chunks = -(-S // chunk)
    dtype = q_lat.dtype
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None

    def pad(a):  # [B,T,H,X] -> [B,rows,X]
        return jnp.pad(a.reshape(B, M, -1), ((0, 0), (0, rows - M), (0, 0)))

    q_slot = jnp.pad(jnp.repeat(slots.astype(jnp.int32), H, axis=1), ((0, 0), (0, rows - M)), constant_values=-1)
    layer = jnp.reshape(layer, (1,)).astype(jnp.int32)

    def kernel(layer_ref, slot_ref, ql_ref, qp_ref, lat_ref, kpe_ref, out_ref, lse_ref):
        b, j = pl.program_id(0), pl.program_id(2)
        li = layer_ref[0]
        q_slot = slot_ref[...]  # [bm]
        ql, qp = ql_ref[...], qp_ref[...]  # [bm,R], [bm,Kr]
        start = j * chunk
        end = jnp.minimum(start + chunk, jnp.minimum(S, jnp.max(q_slot) + 1))  # nothing past the last seen slot

        def step(i, carry):
            acc, m, den = carry
            s0 = start + i * BLOCK_S
            pos = s0 + jnp.arange(BLOCK_S)
            ok = (pos < S)[:, None]
            lat = plt.load(lat_ref.at[li, b, pl.ds(s0, BLOCK_S), :], mask=ok, other=0).astype(dtype)  # [bs,R]
            kpe = plt.load(kpe_ref.at[li, b, pl.ds(s0, BLOCK_S), :], mask=ok, other=0).astype(dtype)  # [bs,Kr]
            s = (plt.dot(ql, lat, trans_b=True, precision=precision)
                 + plt.dot(qp, kpe, trans_b=True, precision=precision)) * scale  # [bm,bs] fp32
            s = jnp.where(pos[None, :] <= q_slot[:, None], s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = jnp.exp(s - m_new[:, None])
            alpha = jnp.exp(m - m_new)
            acc = acc * alpha[:, None] + plt.dot(p.astype(dtype), lat, precision=precision)
            return acc, m_new, den * alpha + jnp.sum(p, axis=1)

        init = (jnp.zeros((bm, R), jnp.float32), jnp.full((bm,), _NEG, jnp.float32), jnp.zeros((bm,), jnp.float32))
        acc, m, den = jax.lax.fori_loop(0, jnp.maximum(end - start, 0) // BLOCK_S + ((end - start) % BLOCK_S > 0),
                                      step, init)
        den = jnp.maximum(den, 1e-30)
        out_ref[...] = (acc / den[:, None]).astype(out_ref.dtype)
        lse_ref[...] = m + jnp.log(den)

    full = lambda *shape: pl.BlockSpec(shape, lambda b, i, j: (0,) * len(shape))  # noqa: E731
    q_block = lambda x: pl.BlockSpec((None, bm, x), lambda b, i, j: (b, i, 0))  # noqa: E731
    whole = pl.BlockSpec()  # the stacked cache, indexed in the kernel
    out, lse = pl.pallas_call(
        kernel, grid=(B, n_m, n_chunks),
        in_specs=[full(1), pl.BlockSpec((None, bm), lambda b, i, j: (b, i)), q_block(R), q_block(Kr),
                  whole, whole],
        out_specs=[pl.BlockSpec((None, None, bm, R), lambda b, i, j: (b, j, i, 0)),
                   pl.BlockSpec((None, None, bm), lambda b, i, j: (b, j, i))],
        out_shape=[jax.ShapeDtypeStruct((B, n_chunks, rows, R), dtype),
                   jax.ShapeDtypeStruct((B, n_chunks, rows), jnp.float32)],
        interpret=interpret,
        compiler_params=None if interpret else plt.CompilerParams(num_warps=NUM_WARPS * max(1, bm // 32),
                                                                  num_stages=NUM_STAGES if bm <= 32 else 2),
    )(layer, q_slot, pad(q_lat), pad(q_pe.astype(dtype)), latent, k_pe)  # the cache's blocks cast as they load
    return (out[:, :, :M].reshape(B, n_chunks, T, H, R),
            lse[:, :, :M].reshape(B, n_chunks, T, H))
