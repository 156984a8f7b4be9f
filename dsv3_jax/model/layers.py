"""Building blocks shared by every sub-module: the one einsum wrapper, Linear, RMSNorm, Embed.

Every projection in the model goes through `einsum`, so the precision policy (what dtype the
operands are cast to, what the dot accumulates in, or the FP8 recipe of `dsv3_jax.fp8`) lives
in one place. Every parameter carries logical axis names (`logical_axes` metadata) that
`dsv3_jax.parallel.RULES` maps to mesh axes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax import fp8
from dsv3_jax.parallel.mesh import constrain


def einsum(spec: str, x: jax.Array, w: jax.Array, *, dtype, recipe: fp8.Recipe | None = None) -> jax.Array:
    """`x` (activations) times `w` (weights) in the compute dtype, or under an FP8 `recipe`.

    Both operands are cast to `dtype`; fp32 compute asks for full-precision dots (TPU/GPU would
    otherwise use bf16 passes), lower-precision compute accumulates in fp32 and rounds once.
    With a recipe, `fp8.einsum` quantises both operands (from the master weights) instead.
    """
    if recipe is not None:
        return fp8.einsum(spec, x, w, dtype=dtype, recipe=recipe)
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), precision=jax.lax.Precision.HIGHEST)
    return _low_precision_einsum(spec, x, w, jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _low_precision_einsum(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """Operands in `dtype`, fp32 accumulation, one rounding. A custom gradient because the
    automatic one differentiates through the fp32 accumulator: it would run both backward GEMMs
    on fp32 operands (TF32 passes on a GPU, 45% of the bench step's matmul time).
    Here dX and dW run on `dtype` operands; dW comes out in fp32 for the fp32 master weights.
    """
    return _dot(spec, x.astype(dtype), w.astype(dtype)).astype(dtype)


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def einsum_f32(spec: str, a: jax.Array, b: jax.Array, *, dtype, out_dtype=jnp.float32) -> jax.Array:
    """Operands cast to `dtype`, accumulated in fp32 and returned in fp32 (not rounded) for
    consumers that keep working in fp32, or rounded once to `out_dtype` by the GEMM itself
    (the loss's logits: half the bytes for the passes that read them); no gradient rule of its own."""
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=out_dtype)


def matmul_f32(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [N,D] times fp32 w [D,E] -> [N,E] in fp32 (the router's logits, SPEC C).

    fp32 x takes a full-precision dot. bf16 x is multiplied exactly by w written as three bf16
    pieces (w = w1 + w2 + w3): one bf16 tensor-core GEMM of width 3E, summed per piece in fp32.
    The weight gradient does the same with the fp32 output gradient in pieces; the input
    gradient, rounded to bf16 at the end, takes the three largest piece products (~2^-16).
    """
    if x.dtype == jnp.float32:
        return jnp.einsum("nd,de->ne", x, w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return _matmul_pieces(x, w)


def _pieces(a: jax.Array, n: int) -> jax.Array:
    """fp32 a [...,E] -> n bf16 pieces [...,n,E], each the rounding of what the previous left over;
    three sum back to a exactly (8 significand bits each, fp32 has 24)."""
    out = []
    for _ in range(n):
        out.append(a.astype(jnp.bfloat16))
        a = a - out[-1].astype(jnp.float32)
    return jnp.stack(out, axis=-2)


@jax.custom_vjp
def _matmul_pieces(x: jax.Array, w: jax.Array) -> jax.Array:
    return _matmul_pieces_fwd(x, w)[0]


def _matmul_pieces_fwd(x, w):
    (N, D), E = x.shape, w.shape[1]
    w3 = _pieces(w.astype(jnp.float32), 3)  # [D,3,E]
    y = _dot("nd,dk->nk", x, w3.reshape(D, 3 * E)).reshape(N, 3, E).sum(1)
    return y, (x, w3[:, :2], jnp.zeros((0,), w.dtype))


def _matmul_pieces_bwd(res, g):
    x, w2, w_like = res  # w2 [D,2,E]: w's two largest pieces
    (N, D), E = x.shape, g.shape[1]
    g3 = _pieces(g, 3)  # [N,3,E]
    dw = _dot("nd,nk->dk", x, g3.reshape(N, 3 * E)).reshape(D, 3, E).sum(1)
    lhs = jnp.concatenate([g3[:, 0], g3[:, 0], g3[:, 1]], axis=-1)  # [N,3E]: g1 g1 g2
    rhs = jnp.concatenate([w2[:, 0], w2[:, 1], w2[:, 0]], axis=-1)  # [D,3E]: w1 w2 w1
    dx = _dot("nk,dk->nd", lhs, rhs)
    return dx.astype(x.dtype), dw.astype(w_like.dtype)


_matmul_pieces.defvjp(_matmul_pieces_fwd, _matmul_pieces_bwd)


def _low_precision_fwd(spec, x, w, dtype):
    xc, wc = x.astype(dtype), w.astype(dtype)
    return _dot(spec, xc, wc).astype(dtype), (xc, wc, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _low_precision_bwd(spec, dtype, res, g):
    xc, wc, x_like, w_like = res  # empty arrays carry the primal dtypes
    ins, out = spec.split("->")
    xs, ws = ins.split(",")
    g = g.astype(dtype)
    return _dot(f"{out},{ws}->{xs}", g, wc).astype(x_like.dtype), _dot(f"{xs},{out}->{ws}", xc, g).astype(w_like.dtype)


_low_precision_einsum.defvjp(_low_precision_fwd, _low_precision_bwd)


def init_normal(rngs: nnx.Rngs, shape, std: float, param_dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(param_dtype)


class Linear(nnx.Module):
    """y = x @ kernel, kernel stored [in, out] (the transpose of a torch Linear weight).

    `quantized=False` keeps the projection out of the FP8 recipe (`fp8.use`): the output head.
    """

    def __init__(self, d_in: int, d_out: int, *, std: float, rngs: nnx.Rngs, dtype, param_dtype,
                 axes: tuple[str | None, str | None] = (None, None), quantized: bool = True):
        self.kernel = nnx.Param(init_normal(rngs, (d_in, d_out), std, param_dtype), logical_axes=axes)
        self.dtype = dtype
        self.quantized = quantized

    def __call__(self, x: jax.Array) -> jax.Array:  # [...,D] -> [...,F]
        recipe = fp8.active() if self.quantized else None
        return einsum("...d,df->...f", x, self.kernel[...], dtype=self.dtype, recipe=recipe)


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) * scale; statistics in fp32.

    Follows HF transformers: the normalised value is rounded to the compute dtype before the
    scale multiply (OFF's `F.rms_norm` multiplies in fp32; the two differ by ~1 bf16 ulp).
    """

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return _scaled(self.scale[...], normed, jnp.dtype(self.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _scaled(scale: jax.Array, normed: jax.Array, dtype) -> jax.Array:
    """scale [D] times normed [..., D], both rounded to `dtype` first. A custom gradient because
    autodiff sums the scale's gradient over every token in `dtype`: in bf16 that was ~1% off
    at 16,384 tokens. Here the exact products are summed in fp32; the input's gradient is
    autodiff's."""
    return scale.astype(dtype) * normed.astype(dtype)


def _scaled_fwd(scale, normed, dtype):
    return _scaled(scale, normed, dtype), (scale, normed.astype(dtype), jnp.zeros((0,), normed.dtype))


def _scaled_bwd(dtype, res, g):
    scale, normed, normed_like = res  # an empty array carries the input's dtype
    tokens = tuple(range(g.ndim - 1))
    dscale = jnp.sum(g.astype(jnp.float32) * normed.astype(jnp.float32), axis=tokens)
    return dscale.astype(scale.dtype), (g * scale.astype(dtype)).astype(normed_like.dtype)


_scaled.defvjp(_scaled_fwd, _scaled_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def broadcast_new_axis(x: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
    """x copied along a new axis `axis` of `shape` (MLA's rope key for every head, a decode step's
    tokens for every expert). A custom gradient because autodiff sums the copies' cotangents in
    x's dtype (bf16: ~0.4% off over 16 copies, 0.7% over 128, against 0.13% for one rounding);
    here in fp32, rounded once, as torch's expand does."""
    return jnp.broadcast_to(jnp.expand_dims(x, axis), shape)


def _broadcast_fwd(x, shape, axis):
    return broadcast_new_axis(x, shape, axis), jnp.zeros((0,), x.dtype)


def _broadcast_bwd(shape, axis, x_like, g):
    """The copies' sum as a product with a vector of ones, accumulated in fp32: XLA ran the sum
    over MLA's 16 heads as a loop fusion at 0.3 TB/s in the H200 bench step (0.115 ms a layer)."""
    ones = jnp.ones((shape[axis],), g.dtype)
    precision = jax.lax.Precision.HIGHEST if g.dtype == jnp.float32 else None
    total = jnp.tensordot(g, ones, axes=([axis], [0]), precision=precision, preferred_element_type=jnp.float32)
    return (total.astype(x_like.dtype),)


broadcast_new_axis.defvjp(_broadcast_fwd, _broadcast_bwd)


class Embed(nnx.Module):
    """Token embedding table [V, D]."""

    def __init__(self, vocab: int, dim: int, *, std: float, rngs: nnx.Rngs, dtype, param_dtype):
        self.embedding = nnx.Param(init_normal(rngs, (vocab, dim), std, param_dtype), logical_axes=("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        return lookup(self.embedding[...], tokens).astype(self.dtype)


@jax.custom_vjp
def lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """table [V,D] rows at tokens [B,T] -> [B,T,D]. A custom gradient because autodiff adds a
    row's cotangents in the table's dtype: a bfloat16 table (master weights) summed a frequent
    token's thousands of terms in bfloat16; here in fp32, rounded once."""
    return jnp.take(table, tokens, axis=0)


def _lookup_fwd(table, tokens):
    return lookup(table, tokens), (jnp.zeros((table.shape[0], 0), table.dtype), tokens)


def _lookup_bwd(res, g):
    like, tokens = res  # like [V,0]: the table's rows and dtype
    dtable = jnp.zeros((like.shape[0], g.shape[-1]), jnp.float32).at[tokens].add(g.astype(jnp.float32))
    return dtable.astype(like.dtype), None


lookup.defvjp(_lookup_fwd, _lookup_bwd)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN and the shared experts."""

    def __init__(self, d: int, hidden: int, *, std: float, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(std=std, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Linear(d, hidden, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(d, hidden, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(hidden, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B,T,D] -> [B,T,D]
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)  # [B,T,F]
        return self.down_proj(constrain(h, "batch", *(None,) * (h.ndim - 2), "act_mlp"))
