"""Causal flash-attention backward for Hopper GPUs as two Mosaic GPU kernels, q/k head dim K
and v head dim Kv apart (MLA's 192 and 128).

1. `_dkv`: a program per (128 keys, head, batch row), 64 keys a compute warpgroup. For each
   64-query tile from the diagonal on (q, dO, the log-sum-exp and delta = rowsum(O dO) stream
   through two SMEM stages): S^T = K Q^T, P^T = exp(S^T - lse), dV += P^T dO, dP^T = V dO^T,
   dS^T = P^T (dP^T - delta), dK += dS^T Q; dS^T goes out to HBM ([B,H,T/64,T,64]: query tile,
   key, query) by TMA while dK's product runs.
2. `_dq`: a program per (128 queries, head, batch row): dQ = dS K over the keys up to the
   block's last, a memory warpgroup streaming dS^T and K tiles through four stages to two
   compute warpgroups of 64 queries (dS is dS^T read through a transposed SMEM view).

dK can come out in column parts (MLA's per-head k_nope and its broadcast k_pe), each written by
TMA on its own, so that XLA never slices the whole apart (-0.47 ms a bench step on an H200).

Writing dS out spares the one-kernel form's third accumulator and its per-tile reduction of
dQ into HBM (the thirtieth session's kernel, 2.73 ms at the bench layer): here 1.37-1.50 +
0.38 ms, 1.79 with delta, against cuDNN's 2.30 (H200, B4 T4096 H16, 192/128), with no atomic
adds, so the same bits every run. The price is dS^T's buffer, B H T^2 bf16 (2 GiB at the bench
layer): heads run in chunks whose buffer stays within `DS_BUDGET` bytes. Heaviest blocks
first: the block index varies slowest in both grids, starting at the diagonal's longest rows
(measured: 0.38 against 0.59 ms for dQ's grid with the block index varying fastest). Measured and
not kept: the scores' and dP's products issued together (1.66 ms for `_dkv`), 32-query steps
(1.64), P rounded to bf16 before dS (1.49), three SMEM stages (1.72), a stage released only
after the next step's scores (1.88); ptxas holds `_dkv` to 255 registers with ~350
bytes spilled. Nor dK as a third kernel, dS^T Q by `_dq`'s pipeline over the keys (bitwise the
same; `_dkv` then holds no dK accumulator and spills nothing): 1.32 ms without dK plus 0.52
against `_dkv`'s 1.68 alone, the backward 2.26 against 2.04 (thirty-ninth session), so the
chain of dependent products and exponentials a step, not the spills, bounds `_dkv`.
Every SMEM tile is 64 columns wide (128-byte swizzles): `_dkv` took 1.40-1.42 ms in flight
against 1.53-1.60 with its Q, dO, K and V in 32-column tiles, and 1.34 with one dS^T buffer a
warpgroup instead of two (fortieth session, same bits). Its time follows its products: without
dK's, dP's or dV's product it ran 11-13% faster, without the exponentials 4%, without the dS^T
stores 3%. Measured then and not kept: three stages with one dS^T buffer (1.72 ms); each step's
S^T issued before the previous step's dK, so that its exponentials run under dK's product
(2.7-2.8 ms synced: both live in registers); the two warpgroups taking turns to issue their
dV and dP (and dK) products (1.49-1.51 ms).
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from dsv3_jax.kernels.hopper import COMPUTE_REGISTERS, MEMORY_REGISTERS, stage_tile, swizzled, wait_last_phases

LOG2E = math.log2(math.e)
BQ, BKV, STAGES = 64, 128, 2  # _dkv: queries a step, keys a program (64 a warpgroup), SMEM stages
DQ_BQ, DQ_BK, DQ_STAGES = 128, 64, 4  # _dq: queries a program (64 a warpgroup), keys a step, stages
DS_BUDGET = 2 ** 31  # bytes of dS^T a call may hold
TILE_COLS = 64  # columns of every SMEM tile (128-byte swizzles); dK's parts are written on their boundaries


def takes(q: jax.Array, v: jax.Array) -> bool:
    """Whether the kernels take q [B,T,H,K], v [B,T,H,Kv]: bf16/fp16, T a multiple of 128, head
    dims multiples of 64 with K + Kv <= 320 (the two accumulators and the step's scores fit a
    warpgroup's registers at 192 + 128)."""
    K, Kv = q.shape[-1], v.shape[-1]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[1] % BKV == 0
            and K % 64 == 0 and Kv % 64 == 0 and K + Kv <= 320)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array, g: jax.Array,
             scale: float, k_parts: tuple[int, ...] | None = None
             ) -> tuple[jax.Array, tuple[jax.Array, ...], jax.Array]:
    """Gradients of causal softmax(q k^T * scale) v. q, k [B,T,H,K], v, out, g [B,T,H,Kv];
    lse [B,H,T] f32, the natural-log log-sum-exp of the scaled scores -> dq [B,T,H,K], dk as
    one array [B,T,H,w] for each part width w of `k_parts` (k's columns in order; default one
    part, K wide), dv [B,T,H,Kv], in q's dtype. Each part is written by the kernel on its own
    where its columns fall on the key tiles' 64-column boundaries (MLA's 128 + 64), so the
    caller never slices k's gradient apart; otherwise the whole is written and sliced."""
    B, T, H, K = q.shape
    k_parts = k_parts or (K,)
    if sum(k_parts) != K:
        raise ValueError(f"k_parts {k_parts} do not add up to the head dim {K}")
    written = k_parts if all(w % TILE_COLS == 0 for w in k_parts) else (K,)
    lse = lse * LOG2E  # the kernels exponentiate in base 2
    delta = jnp.einsum("bthk,bthk->bht", out.astype(jnp.float32), g.astype(jnp.float32))  # [B,H,T]
    per_head = B * T * T * jnp.dtype(q.dtype).itemsize
    chunk = max(c for c in range(1, H + 1) if H % c == 0 and (c == 1 or c * per_head <= DS_BUDGET))
    grads = []
    for h0 in range(0, H, chunk):
        *dks, dv, ds_t = _dkv(q, k, v, lse, delta, g, scale, (h0, chunk), written)
        grads.append((_dq(ds_t, k, scale, (h0, chunk)), *dks, dv))
    dq, *dks, dv = (parts[0] if len(grads) == 1 else jnp.concatenate(parts, axis=2) for parts in zip(*grads))
    if len(dks) != len(k_parts):
        dks = jnp.split(dks[0], list(itertools.accumulate(k_parts[:-1])), axis=-1)
    return dq, tuple(dks), dv


def _smem(shape, dtype):
    """SMEM in tiles of [8, `TILE_COLS`], swizzled to a row of that many elements."""
    return plgpu.SMEM(shape, dtype, transforms=swizzled((TILE_COLS,), dtype))


def _dkv(q, k, v, lse, delta, g, scale, heads, k_parts):
    """-> dk (scaled) as [B,T,Hc,w] for each part width w of `k_parts` (multiples of `TILE_COLS`),
    dv [B,T,Hc,Kv] for heads h0..h0+Hc, and dS^T [B,Hc,T/64,T,64] (query tile, key, query
    within the tile; only the tiles on and below the diagonal written)."""
    B, T, _, K = q.shape
    Kv, dtype = v.shape[-1], q.dtype
    (h0, Hc), n_kv, n_q = heads, T // BKV, T // BQ
    offsets = (0, *itertools.accumulate(k_parts[:-1]))

    def body(q_ref, k_ref, v_ref, lse_ref, delta_ref, g_ref, *outs):
        *dk_refs, dv_ref, ds_ref = outs
        hl, b, kv = lax.axis_index("heads"), lax.axis_index("batch"), lax.axis_index("kv")
        h, wg = h0 + hl, lax.axis_index("wg")
        kv0 = kv * BKV
        j0 = kv * (BKV // BQ)  # the first query tile that sees this block
        n_steps = n_q - j0

        def scoped(k_smem, v_smem, q_smem, g_smem, lse_smem, delta_smem, ds_smem,
                   k_bar, v_bar, q_bar, g_bar, lse_bar, delta_bar, consumed):
            def load(step, slot):
                rows = pl.ds((j0 + step) * BQ, BQ)
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot], lse_bar.at[slot])
                plgpu.copy_gmem_to_smem(g_ref.at[b, rows, h], g_smem.at[slot], g_bar.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[slot], delta_bar.at[slot])

            @pl.when(wg == 0)  # warpgroup 0 issues the loads (a third, memory warpgroup measured slower)
            def _prologue():
                plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(kv0, BKV), h], k_smem, k_bar)
                plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(kv0, BKV), h], v_smem, v_bar)
                for s in range(STAGES):
                    pl.when(s < n_steps)(functools.partial(load, s, s))

            rows = pl.ds(wg * 64, 64)
            k_w, v_w = k_smem.at[rows], v_smem.at[rows]
            plgpu.barrier_wait(k_bar)
            plgpu.barrier_wait(v_bar)
            row_layout = plgpu.Layout.WGMMA.reduce(0)

            def step(i, dk_acc, dv_acc, masked):
                slot = lax.rem(i, STAGES)
                nxt = i + STAGES - 1

                @pl.when((wg == 0) & (i >= 1) & (nxt < n_steps))
                def _():
                    nslot = lax.rem(nxt, STAGES)
                    plgpu.barrier_wait(consumed.at[nslot])
                    load(nxt, nslot)

                q_s, g_s = q_smem.at[slot], g_smem.at[slot]
                plgpu.barrier_wait(q_bar.at[slot])

                def scores(acc):
                    plgpu.wgmma(acc, k_w, plgpu.transpose_ref(q_s, (1, 0)))
                    return acc[...]

                s_t = pl.run_scoped(scores, plgpu.ACC((64, BQ), jnp.float32))  # [keys, queries]
                plgpu.barrier_wait(lse_bar.at[slot])
                lse_row = plgpu.load(lse_smem.at[slot], (), layout=row_layout)
                logits = s_t * (scale * LOG2E) - lax.broadcast_in_dim(lse_row, (64, BQ), [1])
                if masked:  # the diagonal's tiles: key <= query
                    diff = (plgpu.broadcasted_iota(jnp.int32, (64, BQ), 1, layout=plgpu.Layout.WGMMA)
                            - plgpu.broadcasted_iota(jnp.int32, (64, BQ), 0, layout=plgpu.Layout.WGMMA))
                    logits = jnp.where(diff >= kv0 + wg * 64 - (j0 + i) * BQ, logits, -jnp.inf)
                p_t = jnp.exp2(logits)
                plgpu.barrier_wait(g_bar.at[slot])
                plgpu.wgmma(dv_acc, p_t.astype(dtype), g_s)

                def dp(acc):
                    plgpu.wgmma(acc, v_w, plgpu.transpose_ref(g_s, (1, 0)))
                    return acc[...]

                dp_t = pl.run_scoped(dp, plgpu.ACC((64, BQ), jnp.float32))
                plgpu.barrier_wait(delta_bar.at[slot])
                delta_row = plgpu.load(delta_smem.at[slot], (), layout=row_layout)
                ds_t = (p_t * (dp_t - lax.broadcast_in_dim(delta_row, (64, BQ), [1]))).astype(dtype)
                plgpu.wgmma(dk_acc, ds_t, q_s)
                buf = ds_smem.at[wg]
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous step's store has read it
                buf[...] = ds_t
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(buf, ds_ref.at[b, hl, j0 + i, pl.ds(kv0 + wg * 64, 64)])
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(consumed.at[slot])

            def accumulate(dk_acc, dv_acc):
                pl.loop(0, BKV // BQ)(functools.partial(step, dk_acc=dk_acc, dv_acc=dv_acc, masked=True))
                pl.loop(BKV // BQ, n_steps)(functools.partial(step, dk_acc=dk_acc, dv_acc=dv_acc, masked=False))
                pl.when(wg == 0)(lambda: wait_last_phases(consumed, n_steps, STAGES))
                return dk_acc[...], dv_acc[...]

            dk, dv = pl.run_scoped(accumulate, plgpu.ACC((64, K), jnp.float32), plgpu.ACC((64, Kv), jnp.float32))
            k_w[...] = (dk * scale).astype(dtype)
            v_w[...] = dv.astype(dtype)
            plgpu.commit_smem()
            n = 64 if len(k_parts) == 1 else 8  # rows a copy: a part is contiguous in SMEM within 8-row tiles
            for off, w, dk_ref in zip(offsets, k_parts, dk_refs):
                for r in range(0, 64, n):
                    plgpu.copy_smem_to_gmem(k_w.at[pl.ds(r, n), pl.ds(off, w)],
                                            dk_ref.at[b, pl.ds(kv0 + wg * 64 + r, n), hl], commit_group=False)
            plgpu.copy_smem_to_gmem(v_w, dv_ref.at[b, pl.ds(kv0 + wg * 64, 64), hl], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            _smem((BKV, K), dtype), _smem((BKV, Kv), dtype),
            _smem((STAGES, BQ, K), dtype), _smem((STAGES, BQ, Kv), dtype),
            plgpu.SMEM((STAGES, BQ), jnp.float32), plgpu.SMEM((STAGES, BQ), jnp.float32),
            _smem((2, 64, BQ), dtype),  # dS^T: a buffer a warpgroup
            plgpu.Barrier(), plgpu.Barrier(),
            *(plgpu.Barrier(num_barriers=STAGES) for _ in range(4)),
            plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),
            collective_axes="wg")

    mesh = plgpu.Mesh(grid=(Hc, B, n_kv), grid_names=("heads", "batch", "kv"), num_threads=2, thread_name="wg")
    out_type = (*(jax.ShapeDtypeStruct((B, T, Hc, w), dtype) for w in k_parts),
                jax.ShapeDtypeStruct((B, T, Hc, Kv), dtype), jax.ShapeDtypeStruct((B, Hc, n_q, T, BQ), dtype))
    return pl.kernel(body, out_type=out_type, mesh=mesh, compiler_params=plgpu.CompilerParams(approx_math=True),
                     name="attention_backward_dkv")(q, k, v, lse, delta, g)


def _dq(ds_t, k, scale, heads):
    """dS^T [B,Hc,T/64,T,64], k [B,T,H,K] -> dq [B,T,Hc,K] = scale dS k, each 128-query block
    summing over the keys up to its last."""
    B, T, _, K = k.shape
    dtype = k.dtype
    (h0, Hc), n_qb = heads, T // DQ_BQ
    tiles = DQ_BQ // BQ  # dS^T query tiles a program

    def body(ds_ref, k_ref, dq_ref):
        hl, b = lax.axis_index("heads"), lax.axis_index("batch")
        qb, wg = n_qb - 1 - lax.axis_index("qb"), lax.axis_index("wg")
        n_steps = (qb + 1) * (DQ_BQ // DQ_BK)

        def scoped(ds_smem, k_smem, out_smem, ds_bar, k_bar, consumed):
            @pl.when(wg == 2)
            def _memory():
                plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

                @pl.loop(0, n_steps)
                def _(i):
                    slot = lax.rem(i, DQ_STAGES)
                    pl.when(i >= DQ_STAGES)(lambda: plgpu.barrier_wait(consumed.at[slot]))
                    keys = pl.ds(i * DQ_BK, DQ_BK)
                    plgpu.copy_gmem_to_smem(ds_ref.at[b, hl, pl.ds(qb * tiles, tiles), keys], ds_smem.at[slot],
                                            ds_bar.at[slot])
                    plgpu.copy_gmem_to_smem(k_ref.at[b, keys, h0 + hl], k_smem.at[slot], k_bar.at[slot])

                wait_last_phases(consumed, n_steps, DQ_STAGES)

            @pl.when(wg < 2)
            def _compute():
                plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")

                def product(acc):
                    @pl.loop(0, n_steps)
                    def _(i):
                        slot = lax.rem(i, DQ_STAGES)
                        plgpu.barrier_wait(ds_bar.at[slot])
                        plgpu.barrier_wait(k_bar.at[slot])
                        plgpu.wgmma(acc, plgpu.transpose_ref(ds_smem.at[slot, wg], (1, 0)), k_smem.at[slot])
                        plgpu.wgmma_wait(1)  # the previous step's product is done with its stage
                        pl.when(i > 0)(lambda: plgpu.barrier_arrive(consumed.at[lax.rem(i - 1, DQ_STAGES)]))

                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(consumed.at[lax.rem(n_steps - 1, DQ_STAGES)])
                    return acc[...]

                dq = pl.run_scoped(product, plgpu.ACC((BQ, K), jnp.float32))
                stage_tile(dq * scale, out_smem.at[wg])
                plgpu.copy_smem_to_gmem(out_smem.at[wg], dq_ref.at[b, pl.ds(qb * DQ_BQ + wg * BQ, BQ), hl])
                plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            _smem((DQ_STAGES, tiles, DQ_BK, BQ), dtype), _smem((DQ_STAGES, DQ_BK, K), dtype),
            _smem((2, BQ, K), dtype),
            plgpu.Barrier(num_barriers=DQ_STAGES), plgpu.Barrier(num_barriers=DQ_STAGES),
            plgpu.Barrier(num_arrivals=2, num_barriers=DQ_STAGES),
            collective_axes="wg")

    mesh = plgpu.Mesh(grid=(Hc, B, n_qb), grid_names=("heads", "batch", "qb"), num_threads=3, thread_name="wg")
    return pl.kernel(body, out_type=jax.ShapeDtypeStruct((B, T, Hc, K), dtype), mesh=mesh,
                     compiler_params=plgpu.CompilerParams(approx_math=True), name="attention_backward_dq")(ds_t, k)
