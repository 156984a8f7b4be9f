"""Do the backend kernels agree with the portable path? Prints one JSON line.

Compares, on the current backend, every available grouped-matmul implementation against the
"tiled" one and the other ops' implementations against "xla" (attention; the routed experts'
row moves; the block-scaled FP8 matmul, through fp8_native's linear; the loss's softmax
passes; the optimizer's AdamW step over a layer stack with master weights), forward and
gradients, in bf16 at a bench-like shape, and the latent-cache decode
attention's forward at a decode step's shape. With more than one device it also runs the routed
experts expert-parallel over all of them, on each transport, against the same problem on one
device. Run it on a GPU with tokamax installed to check the GPU kernels.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dsv3_jax import fp8, kernels, parallel  # noqa: E402
from dsv3_jax.kernels import (  # noqa: E402
    attention,
    cross_entropy,
    grouped_matmul,
    latent_attention,
    layer_update,
    row_gather,
    scaled_matmul,
)
from dsv3_jax.parallel import routed_experts  # noqa: E402
from dsv3_jax.parallel.expert import TRANSPORTS, place  # noqa: E402
from dsv3_jax.train.config import TrainConfig  # noqa: E402
from dsv3_jax.train.optimizer import global_norm, make_optimizer, master_parts  # noqa: E402


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def compare(out: dict, op: str, fn, impls, ref_impl: str, *args) -> None:
    """out[op/impl] = relative errors of fn(impl, *args)'s outputs against ref_impl's."""
    ref = jax.jit(fn, static_argnums=0)(ref_impl, *args)
    for impl in impls:
        try:
            got = jax.jit(fn, static_argnums=0)(impl, *args)
            out[f"{op}/{impl}"] = [rel(a, b) for a, b in zip(got, ref)]
        except Exception as e:  # an implementation this backend lacks
            out[f"{op}/{impl}"] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"


def main():
    rs = np.random.RandomState(0)
    out = {"backend": jax.default_backend(), "devices": str(jax.devices()[0])}
    small = jax.default_backend() == "cpu"
    M, K, N, E = (1024, 128, 64, 8) if small else (8192, 1024, 512, 64)
    x = jnp.asarray(rs.randn(M, K) * 0.5, jnp.bfloat16)
    w = jnp.asarray(rs.randn(E, K, N) * 0.05, jnp.bfloat16)
    sizes = jnp.asarray(np.bincount(rs.randint(0, E, M), minlength=E), jnp.int32)

    def gmm(impl, x, w, sizes):
        f = lambda x, w: grouped_matmul.grouped_matmul(x, w, sizes, impl=impl)
        y, vjp = jax.vjp(f, x, w)
        return (y, *vjp(jnp.ones_like(y)))

    compare(out, "grouped_matmul", gmm, grouped_matmul.IMPLS, "tiled", x, w, sizes)

    n, D, F, top = M // 4, K, N, 6  # routed experts: the row layouts against "grouped" (default kernels)
    logits = rs.randn(n, E) + np.linspace(0, 1.5, E)  # skewed: some experts overflow their blocks
    ids = jnp.asarray(np.argsort(-logits, axis=1)[:, :top], jnp.int32)
    ew = jnp.asarray(rs.rand(n, top), jnp.float32)
    gate_up = jnp.asarray(rs.randn(E, D, 2, F) * 0.05, jnp.bfloat16)
    down = jnp.asarray(rs.randn(E, F, D) * 0.05, jnp.bfloat16)

    def experts(layout, x, gate_up, down):
        with kernels.use(expert_layout=layout):
            f = lambda *a: routed_experts(a[0], ew, ids, *a[1:], dtype=jnp.bfloat16)
            y, vjp = jax.vjp(f, x, gate_up, down)
            return (y, *vjp(jnp.ones_like(y)))

    compare(out, "expert_layout", experts, grouped_matmul.LAYOUTS, "grouped", x[:n, :D], gate_up, down)

    def row_moves(impl, x, rows):  # the dispatch and the combine, forward and gradients
        p = place(ids.reshape(-1), E, 0)
        f = lambda x, rows, w: (row_gather.dispatch(x, top, p.row_src, p.row_dest, impl=impl),
                                row_gather.combine(rows, w, p.row_src, p.row_dest, impl=impl))
        (xs, y), vjp = jax.vjp(f, x, rows, ew)
        return (xs, y, *vjp((rows, y.astype(rows.dtype).astype(y.dtype))))

    compare(out, "row_gather", row_moves, row_gather.IMPLS, "xla", x[:n, :D],
            jnp.asarray(rs.randn(n * top, D), jnp.bfloat16))
    P = len(jax.devices())
    if P > 1:  # expert=P against one device; the transport is chosen when the function is traced
        ref = jax.jit(experts, static_argnums=0)("grouped", x[:n, :D], gate_up, down)
        for transport in TRANSPORTS:
            try:
                with jax.set_mesh(parallel.make_mesh(f"expert={P}")), parallel.expert_transport(transport):
                    got = jax.jit(experts, static_argnums=0)("grouped", x[:n, :D], gate_up, down)
                out[f"expert_parallel_{P}/{transport}"] = [rel(a, b) for a, b in zip(got, ref)]
            except Exception as e:  # a transport this backend lacks
                out[f"expert_parallel_{P}/{transport}"] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"

    def fp8_linear(impl, x, w):  # fp8_native's linear: its three GEMMs through the impl
        with kernels.use(scaled_matmul=impl):
            y, vjp = jax.vjp(lambda x, w: fp8.matmul(x, w, fp8.Recipe(native=True), jnp.bfloat16), x, w[0])
            return (y, *vjp(y))  # not a constant cotangent: XLA's CPU constant folding of FP8 gives NaN

    compare(out, "scaled_matmul", fp8_linear, scaled_matmul.IMPLS, "xla", x, w)

    n, V = (8, 1000) if small else (512, 129280)  # a loss chunk's rows (bench vocabulary)
    logits = jnp.asarray(rs.randn(n, V) * 3, jnp.bfloat16)

    def xent(impl, logits, targets, weight):
        lse = cross_entropy.logsumexp(logits, impl=impl)
        return lse, cross_entropy.xent_grad(logits, lse, targets, weight, impl=impl)

    compare(out, "cross_entropy", xent, cross_entropy.IMPLS, "xla", logits, jnp.asarray(rs.randint(0, V, n)),
            jnp.asarray(rs.rand(n), jnp.float32))

    shape = (2, 300, 7) if small else (3, 64, 512, 256)  # a layer stack: a partial block on the CPU
    stack = nnx.State({"w": nnx.Param(jnp.asarray(rs.randn(*shape) * 0.02, jnp.float32),
                                      logical_axes=("expert", "embed", "mlp")[4 - len(shape):])})  # 1 stacked dim
    tx = make_optimizer(TrainConfig(param_dtype="bfloat16", master_weights=True))
    empty, adam, _ = tx.init(stack)
    moments = lambda t: jax.tree.map(lambda m: jnp.asarray(rs.rand(*m.shape) * 1e-4, m.dtype), t)
    opt = (empty, adam._replace(mu=moments(adam.mu), nu=moments(adam.nu)), empty)
    params, rest = (jax.tree.map(lambda w, i=i: master_parts(w, jnp.bfloat16)[i], stack) for i in (0, 1))
    grad = jax.tree.map(lambda w: jnp.asarray(rs.randn(*w.shape) * 1e-3, jnp.bfloat16), stack)

    def adamw(impl, params, rest, opt, grad):
        with kernels.use(layer_update=impl):
            return jax.tree.leaves(tx.update(params, rest, opt, grad, norm=global_norm(grad), mean_of=1, lr=1e-3,
                                             ok=jnp.bool_(True)))

    compare(out, "layer_update", adamw, layer_update.IMPLS, "xla", params, rest, opt, grad)

    B, T, H = (1, 128, 2) if small else (2, 1024, 16)
    q = jnp.asarray(rs.randn(B, T, H, 192), jnp.bfloat16)
    k = jnp.asarray(rs.randn(B, T, H, 192), jnp.bfloat16)
    v = jnp.asarray(rs.randn(B, T, H, 128), jnp.bfloat16)

    def attn(impl, q, k, v, starts=None):
        f = lambda q, k, v: attention.dot_product_attention(q, k, v, starts, 192 ** -0.5, impl=impl)
        y, vjp = jax.vjp(f, q, k, v)
        return (y, *vjp(jnp.ones_like(y)))

    compare(out, "attention", attn, attention.IMPLS, "xla", q, k, v)

    def attn_parts(impl, q, k_nope, k_pe, v):  # MLA's keys: per-head k_nope, one k_pe for all heads
        keys = lambda k_nope, k_pe: (k_nope, jnp.broadcast_to(k_pe[:, :, None], k_nope.shape[:3] + k_pe.shape[-1:]))
        f = lambda q, k_nope, k_pe, v: attention.dot_product_attention(q, keys(k_nope, k_pe), v, None, 192 ** -0.5,
                                                                       impl=impl)
        y, vjp = jax.vjp(f, q, k_nope, k_pe, v)
        return (y, *vjp(jnp.ones_like(y)))

    compare(out, "attention_k_parts", attn_parts, attention.IMPLS, "xla", q, k[..., :128], k[:, :, 0, 128:], v)
    seg = jnp.asarray(np.sort(rs.randint(0, 5, (B, T)), axis=1))  # packed documents
    compare(out, "attention_documents", attn, attention.IMPLS, "xla", q, k, v, attention.document_starts(seg))

    L, R, Kr, S = (2, 32, 16, 80) if small else (2, 512, 64, 1152)
    # one decode token, two (a speculative round), and 64+ query rows a row (128 heads: the
    # kernel's 64-row blocks, which keep 2 pipeline stages)
    shapes = ((2, 1, 4), (2, 2, 4), (1, 1, 16)) if small else ((32, 1, 16), (32, 2, 16), (8, 1, 128))
    for name, (B, T, H) in zip(("latent_attention", "latent_attention_2_tokens", "latent_attention_many_heads"),
                               shapes):
        q_lat = jnp.asarray(rs.randn(B, T, H, R), jnp.bfloat16)
        q_pe = jnp.asarray(rs.randn(B, T, H, Kr), jnp.bfloat16)
        latent = jnp.asarray(rs.randn(L, B, S, R), jnp.bfloat16)
        k_pe = jnp.asarray(rs.randn(L, B, S, Kr), jnp.bfloat16)
        slots = jnp.asarray(rs.randint(0, S - T, (B, 1)) + np.arange(T), jnp.int32)

        def latent_attn(impl, q_lat, q_pe, latent, k_pe, slots):
            return (latent_attention.merge_chunks(*latent_attention.latent_attention(
                q_lat, q_pe, latent, k_pe, jnp.int32(1), slots, (R + Kr) ** -0.5, impl=impl)),)

        compare(out, name, latent_attn, latent_attention.IMPLS, "xla", q_lat, q_pe, latent, k_pe, slots)
    out["defaults"] = {"grouped_matmul": grouped_matmul.default_impl(),
                       "expert_layout": grouped_matmul.default_layout(),
                       "attention (causal bf16)": attention.default_impl(q, v),
                       "attention (documents)": attention.default_impl(),
                       "latent_attention (decode step)": latent_attention.default_impl(1, R, Kr),
                       "scaled_matmul": scaled_matmul.default_impl(), "row_gather": row_gather.default_impl(),
                       "cross_entropy": cross_entropy.default_impl(),
                       "layer_update (bench routed experts)": layer_update.default_impl((11, 64 * 2048 * 1024))}
    print(json.dumps(out))


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options; --help says so
    main()
