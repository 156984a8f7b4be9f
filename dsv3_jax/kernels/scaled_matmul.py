"""Block-scaled FP8 matmul, the native GEMM of DeepSeek's FP8 recipe (`dsv3_jax.fp8`, SPEC F):
out[m,n] = sum over 128-wide K chunks c of a_s[m,c] * b_s[c,n] * (aq[m,c] . bq[c,n]), in fp32.

Two implementations of the same product:
- "xla": `fp8.scaled_dot`'s own form, one FP8 `dot_general` batched over the chunks, whose
  [K/128, M, N] fp32 partial products are scaled and summed (every backend; the default off GPU).
- "pallas": one Pallas (Triton) kernel, the default on one GPU. Program (i, j) owns a [128, 128]
  output block and walks K one chunk at a time: the chunk's FP8 product goes to fp32 registers,
  is multiplied by its row and column scales there and added (the promotion DeepSeek's recipe
  prescribes, as their DeepGEMM does); only the output is written. On an H200 at the bench
  step's shapes it runs 2.3-2.9x faster than the XLA form (~290 TFLOP/s; 8 warps, 3 stages,
  [128, 128] blocks were the best of a sweep). It took the fp8_native bench step from 489 to
  462 ms in one call; on a faster machine the step ran 391 ms against 288 for bf16
  (docs/benchmarks.md, eleventh session). It is still ~2.5x slower than a BF16 GEMM there.

The XLA form's partial products are what make fp8_native slow: its FP8 GEMMs and the reductions
over their partials took ~189 ms of a 479 ms bench step on an H200, where BF16 runs the same
projections in ~38 (docs/benchmarks.md, tenth session).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsv3_jax.kernels.choice import forced, one_device

IMPLS = ("xla", "pallas")
BLOCK = (128, 128, 128)  # output rows, output columns, K per chunk (the recipe's 128)
NUM_WARPS, NUM_STAGES = 8, 3  # Triton launch parameters (module constants so a sweep can set them)


def default_impl() -> str:
    """The impl `kernels.use` forces, else pallas on one GPU and xla elsewhere (module docstring).

    Under a mesh of more than one device it is xla: the partitioner splits a dot over the mesh,
    but it would gather a pallas_call's sharded operands onto every device.
    """
    return forced("scaled_matmul") or ("pallas" if jax.default_backend() == "gpu" and one_device() else "xla")


def check_shapes(aq: jax.Array, a_s: jax.Array, bq: jax.Array, b_s: jax.Array) -> None:
    """aq [M,K], bq [K,N] with K whole 128-chunks, a_s [M,K/128], b_s [K/128,N], or a ValueError
    (a wrong scale shape would broadcast silently, or be read out of bounds by the kernel)."""
    (M, K), N, bk = aq.shape, bq.shape[1], BLOCK[2]
    if K % bk:
        raise ValueError(f"scaled matmul: K={K} must be a multiple of {bk} (pad it, as fp8.quantize's callers do)")
    if bq.shape[0] != K or a_s.shape != (M, K // bk) or b_s.shape != (K // bk, N):
        raise ValueError(f"scaled matmul: aq {aq.shape}, a_s {a_s.shape}, bq {bq.shape}, b_s {b_s.shape}; "
                         f"need a_s {(M, K // bk)}, bq {(K, N)}, b_s {(K // bk, N)}")


def pallas(aq: jax.Array, a_s: jax.Array, bq: jax.Array, b_s: jax.Array, interpret: bool = False) -> jax.Array:
    """aq [M,K], bq [K,N] (FP8, K a multiple of 128), a_s [M,K/128], b_s [K/128,N] -> [M,N] fp32."""
    check_shapes(aq, a_s, bq, b_s)
    (M, K), N = aq.shape, bq.shape[1]
    bm, bn, bk = BLOCK

    def kernel(a_ref, ast_ref, bt_ref, bs_ref, out_ref):
        i, j = pl.program_id(0), pl.program_id(1)
        rows, cols = i * bm + jnp.arange(bm), j * bn + jnp.arange(bn)
        row_ok = None if M % bm == 0 else rows < M  # masks only at ragged edges: unmasked loads pipeline better
        col_ok = None if N % bn == 0 else cols < N
        tile = lambda ok: None if ok is None else ok[:, None]  # noqa: E731
        scales = lambda ref, ok: plt.load(ref, mask=ok, other=None if ok is None else 0)  # noqa: E731

        def chunk(c, acc):
            a = plt.load(a_ref.at[pl.ds(i * bm, bm), pl.ds(c * bk, bk)], mask=tile(row_ok))
            bt = plt.load(bt_ref.at[pl.ds(j * bn, bn), pl.ds(c * bk, bk)], mask=tile(col_ok))
            sa, sb = scales(ast_ref.at[c, pl.ds(i * bm, bm)], row_ok), scales(bs_ref.at[c, pl.ds(j * bn, bn)], col_ok)
            return acc + plt.dot(a, bt, trans_b=True) * sa[:, None] * sb[None, :]

        acc = jax.lax.fori_loop(0, K // bk, chunk, jnp.zeros((bm, bn), jnp.float32))
        edges = row_ok is not None or col_ok is not None
        plt.store(out_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], acc,
                  mask=(rows < M)[:, None] & (cols < N)[None, :] if edges else None)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((M, N), jnp.float32), grid=(pl.cdiv(M, bm), pl.cdiv(N, bn)),
        interpret=interpret,
        compiler_params=None if interpret else plt.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
    )(aq, a_s.T.astype(jnp.float32), bq.T, b_s.astype(jnp.float32))  # a_s as [K/128,M]: a chunk's row scales
    # contiguous; B as [N,K]: K-major, as Hopper's FP8 MMA reads it
