"""Routed experts, local or expert-parallel: dropless dispatch, grouped matmul, weighted combine.

`routed_experts` is the one entry point. Outside a mesh (or on one device) it lays the
(token, expert) assignment rows out by expert (`place`: under the "blocks" layout each
expert's first C rows as one block of a batched matmul, the rest grouped; under "grouped"
all grouped) and runs the SwiGLU's three projections on them. Under a `jax.set_mesh` mesh it
runs the same steps per device inside `shard_map`:

1. Each device sorts its own tokens' assignments by expert (tokens are split over
   data x fsdp x expert; experts [E, ...] over expert, their hidden F over tensor).
2. The per-expert counts are all-gathered over the expert axis, so every device knows how
   many rows it sends to and receives from every other device.
3. Rows go to the devices owning their experts (the transport), are laid out by local expert
   and run through the SwiGLU; results travel back the same way.
4. Each device weights and sums its tokens' K results (and sums the tensor-split partials).

Three transports move the rows, chosen by backend and expert-axis size (`choose_transport`) and
overridable with `expert_transport`:
- "ragged": `jax.lax.ragged_all_to_all`, sending exactly the rows needed (GPU/TPU);
- "dense": `jax.lax.all_to_all` of fixed-size blocks, one per device pair (runs everywhere, CPU
  included), each big enough for any routing (P times the ragged transport's rows). With a
  capacity factor c > 0 (`expert_transport(..., capacity_factor=c)`; off by default: c = 1.25
  measured +2.4% at expert=2 on 2 H200s, docs/benchmarks.md) blocks hold c x the balanced
  share of rows, and a step whose routing does not fit (every device knows: the counts are
  all-gathered) takes the other branch of a `lax.cond`, with the full-size blocks;
- "gather": `all_gather` of the tokens themselves over the expert axis, each device's experts on
  the assignments routed to them, and `psum_scatter` of the per-token partial sums. A token
  crosses to another device once rather than once per expert it picked there, so it moves less
  than the others while the expert axis is small next to the top-k (every device then holds most
  tokens' experts anyway). A capacity factor c > 0 sizes each device's expert rows for c x the
  balanced share, with the same fallback branch when more arrive (c = 1.1 measured 7% slower
  than none at expert=2 on 2 H200s, with 28 GiB more peak memory: both branches' buffers).
All are dropless and give the single-device result up to summation order.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from dsv3_jax import fp8
from dsv3_jax.fp8 import grouped_matmul
from dsv3_jax.kernels import row_gather
from dsv3_jax.kernels.grouped_matmul import block_matmul, block_rows, default_layout
from dsv3_jax.kernels.row_gather import take_rows
from dsv3_jax.parallel.mesh import AXES, BATCH_AXES, logical_to_spec

TRANSPORTS = ("ragged", "dense", "gather")
RAGGED_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")
GATHER_GPU_MAX_EP = 8  # "auto" on GPU: the gather transport up to this many expert devices (choose_transport)
_transport = contextvars.ContextVar("dsv3_expert_transport", default=("auto", 0.0))


@contextlib.contextmanager
def expert_transport(name: str, capacity_factor: float = 0.0):
    """Force "ragged", "dense" or "gather" (or "auto") for models traced inside this context, and the
    dense and gather transports' capacity factor (0: room for any routing only; module docstring).

    Read at trace time: a function jitted and traced before keeps the transport it was traced with.
    """
    choose_transport(name)
    if not 0 <= capacity_factor < math.inf:
        raise ValueError(f"expert capacity factor {capacity_factor}: must be a finite number >= 0 (0 = off)")
    token = _transport.set((name, float(capacity_factor)))
    try:
        yield
    finally:
        _transport.reset(token)


def choose_transport(requested: str = "auto", platform: str | None = None, n_ep: int = 2) -> str:
    """"auto" -> "dense" on CPU; "ragged" on TPU, and on GPU once the expert axis exceeds
    GATHER_GPU_MAX_EP devices; "gather" on smaller GPU groups.

    On GPU within one process ragged_all_to_all runs XLA's one-shot kernel, measured 13x slower
    per step than gather at expert=2 on 2 H200s (bench shape, docs/benchmarks.md). Gather moves
    fewer bytes than dense at every P (dense pads to P blocks) and than ragged while P < 0.8 K;
    each device then holds P shares of tokens, no more than its K-fold expert rows while P <= K.
    """
    platform = platform or jax.default_backend()
    if requested not in ("auto",) + TRANSPORTS:
        raise ValueError(f"expert transport {requested!r}: choose from {('auto',) + TRANSPORTS}")
    if requested == "auto":
        if platform not in RAGGED_PLATFORMS:
            return "dense"
        return "gather" if platform != "tpu" and n_ep <= GATHER_GPU_MAX_EP else "ragged"
    if requested == "ragged" and platform not in RAGGED_PLATFORMS:
        raise ValueError(f"expert transport 'ragged': jax.lax.ragged_all_to_all is not implemented on "
                         f"{platform!r}; use 'dense' (or 'auto')")
    return requested


# ---------------------------------------------------------------------------------------------
# local steps (shared by the single-device and the per-device path)


def _narrowest_int(n: int):
    """The narrowest integer dtype holding 0..n: expert ids as sort keys (a GPU radix sort makes
    a pass per key byte; ids as int32 took four)."""
    return next(t for t in (jnp.uint8, jnp.uint16, jnp.int32) if n <= jnp.iinfo(t).max)


def _count_below(x: jax.Array, bounds: jax.Array) -> jax.Array:
    """x [M], bounds [n] -> [n] how many of x are below each bound: one fused compare and sum (a
    scatter-add histogram contends on a few addresses on a GPU)."""
    return jnp.sum(x[None, :] < bounds[:, None], axis=1, dtype=jnp.int32)


def inverse_permutation(perm: jax.Array) -> jax.Array:
    """perm [n], a permutation of 0..n-1 -> inv [n] with inv[perm[i]] = i (an int scatter)."""
    n = perm.shape[0]
    return jnp.zeros((n,), jnp.int32).at[perm].set(jnp.arange(n, dtype=jnp.int32), unique_indices=True)


class Placement(NamedTuple):
    """Where M (token, slot) assignment rows go for the expert matmuls (`place`): the blocks
    (E*C rows) and the grouped rows (R rows), each a gather with its inverse (`take_rows`)."""

    block_src: jax.Array  # [E*C] the assignment in each block row (M: empty)
    block_dest: jax.Array  # [M] each assignment's block row (E*C: not in a block)
    row_src: jax.Array  # [R] the assignment in each grouped row (M: empty)
    row_dest: jax.Array  # [M] each assignment's grouped row (R: not there)
    sizes: jax.Array  # [E] rows of each expert among the grouped rows


class ExpertRows(NamedTuple):
    """Rows laid out by a `Placement` (`kernels.grouped_matmul` LAYOUTS)."""

    blocks: jax.Array  # [E,C,D] expert e's first C rows, zero-padded (C = 0 under "grouped")
    rows: jax.Array  # [R,D] the rest, grouped by expert, then empty rows
    sizes: jax.Array  # [E] rows of each expert in `rows`


def place(ids: jax.Array, n_experts: int, block: int, rows: int | None = None) -> Placement:
    """ids [M]: the expert of each assignment (n_experts: a padding row, placed nowhere).

    Expert e's first `block` assignments (in assignment order) fill block e; the others follow
    in the grouped rows, by expert. The grouped rows number M - block (room for any routing: at
    most that many overflow) or M when block = 0, which makes this a stable sort by expert;
    `rows` sets fewer, for a caller that knows the real assignments fit (any beyond are dropped).
    """
    M, E, C = ids.shape[0], n_experts, block
    R = rows if rows is not None else max(M - C, 0) if C else M
    order = jnp.argsort(ids.astype(_narrowest_int(E)), stable=True).astype(jnp.int32)  # sorted position -> assignment
    sorted_ids = ids[order]
    starts = _count_below(ids, jnp.arange(E + 1, dtype=ids.dtype))  # [E+1] assignments to experts before e
    counts = starts[1:] - starts[:-1]  # padding ids counted nowhere
    e = jnp.minimum(sorted_ids, E - 1)
    rank = jnp.arange(M, dtype=jnp.int32) - starts[:-1][e]  # within its expert
    sizes = jnp.maximum(counts - C, 0)
    real = sorted_ids < E
    block_row = jnp.where(real & (rank < C), e * C + rank, E * C).astype(jnp.int32)
    row = _exclusive_cumsum(sizes)[e] + rank - C
    row = jnp.where(real & (rank >= C) & (row < R), row, R).astype(jnp.int32)
    inverse = inverse_permutation(order)
    block_dest, row_dest = block_row[inverse], row[inverse]
    assignment = jnp.arange(M, dtype=jnp.int32)
    src = lambda dest, n: jnp.full((n,), M, jnp.int32).at[dest].set(assignment, mode="drop")
    return Placement(src(block_dest, E * C), block_dest, src(row_dest, R), row_dest, sizes)


def gather(x: jax.Array, p: Placement, repeat: int = 1) -> ExpertRows:
    """x [M/repeat,D], each row standing for `repeat` consecutive assignments (a token's K
    slots), -> ExpertRows (the grouped rows through `kernels.row_gather.dispatch`)."""
    E = p.sizes.shape[0]
    blocks = jnp.zeros((E, 0, x.shape[1]), x.dtype)
    if p.block_src.shape[0]:
        blocks = take_rows(jnp.repeat(x, repeat, axis=0), p.block_src, p.block_dest).reshape(E, -1, x.shape[1])
    return ExpertRows(blocks, row_gather.dispatch(x, repeat, p.row_src, p.row_dest), p.sizes)


def scatter(y: ExpertRows, p: Placement) -> jax.Array:
    """ExpertRows (outputs, laid out as `gather` laid out their inputs) -> rows [M,D] per assignment."""
    out = take_rows(y.rows, p.row_dest, p.row_src)
    if y.blocks.shape[1]:
        out = out + take_rows(y.blocks.reshape(-1, y.blocks.shape[2]), p.block_dest, p.block_src)
    return out


def expert_layout() -> str:
    """The row layout traced here: the one `kernels.use` chooses ("grouped" by default), but
    "grouped" under an FP8 recipe (its experts run the FP8 grouped matmul)."""
    return default_layout() if fp8.active() is None else "grouped"


def expert_block(rows: int, n_experts: int) -> int:
    """Rows per expert block for `rows` assignments over `n_experts` (0 under "grouped")."""
    return block_rows(rows, n_experts, expert_layout())


def expert_ffn(x: ExpertRows, gate_up: jax.Array, down: jax.Array) -> ExpertRows:
    """SwiGLU per expert: gate_up [E,D,2,F] (gate, up), down [E,F,D]; blocks [E,C,D] -> [E,C,D]
    as batched matmuls, rows [R,D] -> [R,D] as grouped matmuls under the FP8 recipe of `fp8.use`,
    if any.

    Gate and up run as one product on gate_up viewed as [E,D,2F'] (gate columns, then up; F' = F,
    rounded up to the FP8 weight block under a recipe so that no block straddles the two): the
    rows are read once and their input gradient is one product, not a sum of two. The view is a
    free reshape; only a recipe with F not a multiple of the block pays a copy (the padding).
    """
    recipe = fp8.active()
    E, D, _, F = gate_up.shape
    Fp = -(-F // fp8.TILE) * fp8.TILE if recipe else F
    if Fp != F:
        gate_up = jnp.pad(gate_up, ((0, 0), (0, 0), (0, 0), (0, Fp - F)))  # [E,D,2,F] -> [E,D,2,F']
    w = gate_up.reshape(E, D, 2 * Fp)  # [E,D,2,F'] -> [E,D,2F']

    def swiglu(mm, a):
        return mm(_silu_mul(mm(a, w), F, Fp), down)  # [..., 2F'] -> [..., F]

    blocks = swiglu(block_matmul, x.blocks) if x.blocks.shape[1] else x.blocks
    rows = swiglu(lambda a, w: grouped_matmul(a, w, x.sizes, recipe), x.rows)
    return ExpertRows(blocks, rows, x.sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _silu_mul(h: jax.Array, F: int, Fp: int) -> jax.Array:
    """silu(gate) * up of h = [gate | up] [..., 2F'] (halves F' wide, the first F used) -> [..., F].

    Its gradient is the automatic one, joined by one concatenation: differentiating the slices
    adds two zero-padded halves instead, 0.19 against 0.12 ms at the bench shape on an H200."""
    return jax.nn.silu(h[..., :F]) * h[..., Fp:Fp + F]


def _silu_mul_fwd(h, F, Fp):
    return _silu_mul(h, F, Fp), h


def _silu_mul_bwd(F, Fp, h, dy):
    dg, du = jax.vjp(lambda g, u: jax.nn.silu(g) * u, h[..., :F], h[..., Fp:Fp + F])[1](dy)
    pad = [(0, 0)] * (h.ndim - 1) + [(0, Fp - F)]
    return (jnp.concatenate([jnp.pad(dg, pad), jnp.pad(du, pad)], axis=-1),)


_silu_mul.defvjp(_silu_mul_fwd, _silu_mul_bwd)


def combine(y: ExpertRows, weights: jax.Array, p: Placement) -> jax.Array:
    """Expert outputs -> sum_k weights[n,k] * output of assignment (n, k), [N,D] fp32 (the grouped
    rows through `kernels.row_gather.combine`; an assignment sits in a block or a row, never both)."""
    out = row_gather.combine(y.rows, weights, p.row_src, p.row_dest)
    if y.blocks.shape[1]:
        blocks = y.blocks.reshape(-1, y.blocks.shape[2])
        out = out + row_gather.combine(blocks, weights, p.block_src, p.block_dest, impl="xla")
    return out


def _placed(x, weights, p, gate_up, down):
    """x [N,D] in the compute dtype, its assignments placed by p -> [N,D] fp32 (the weighted sums
    of its placed assignments' expert outputs)."""
    K = weights.shape[1]
    return combine(expert_ffn(gather(x, p, K), gate_up, down), weights, p)


def _local(x, weights, expert_ids, gate_up, down):
    """One device: x [N,D] in the compute dtype -> [N,D] fp32."""
    N, K = expert_ids.shape
    E = gate_up.shape[0]
    return _placed(x, weights, place(expert_ids.reshape(N * K), E, expert_block(N * K, E)), gate_up, down)


# ---------------------------------------------------------------------------------------------
# expert parallel


def _mesh():
    """The current mesh if the expert-parallel path applies, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or set(mesh.axis_names) != set(AXES) or math.prod(mesh.shape.values()) == 1:
        return None
    if any(t == AxisType.Manual for t in mesh.axis_types):
        return None
    return mesh


def expert_parallel() -> bool:
    """Whether `routed_experts` traced here runs expert-parallel (a mesh of more than one device)."""
    return _mesh() is not None


def routed_experts(x: jax.Array, weights: jax.Array, expert_ids: jax.Array, gate_up: jax.Array,
                   down: jax.Array, *, dtype) -> jax.Array:
    """x [N,D], weights/expert_ids [N,K], gate_up [E,D,2,F] (gate, up), down [E,F,D] ->
    sum_k weights[n,k] * expert_{ids[n,k]}(x[n]), [N,D] in `dtype`.

    Under a mesh of more than one device this is the shard_map path (module docstring).
    """
    gate_up, down = gate_up.astype(dtype), down.astype(dtype)
    mesh = _mesh()
    if mesh is None:
        return _local(x.astype(dtype), weights, expert_ids, gate_up, down).astype(dtype)
    shape = dict(mesh.shape)
    N, D = x.shape
    E = gate_up.shape[0]
    n_ep = shape["expert"]
    if E % n_ep:
        raise ValueError(f"{E} routed experts do not split over expert={n_ep} devices")
    n_split = math.prod(shape[a] for a in BATCH_AXES)
    pad = -N % n_split  # padding rows: weight 0, sliced off below
    x, weights, expert_ids = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x, weights, expert_ids))
    tok = logical_to_spec(("batch", None), x.shape, shape)
    w_in = logical_to_spec(("expert", None, None, "expert_mlp"), gate_up.shape, shape)
    w_out = PartitionSpec(w_in[0], w_in[3], None)
    transport, capacity_factor = _transport.get()
    body = jax.shard_map(
        lambda *a: _sharded_body(*a, n_ep=n_ep, psum_axis=w_in[3], dtype=dtype, varying=tok[0],
                                 transport=choose_transport(transport, n_ep=n_ep), capacity_factor=capacity_factor),
        mesh=mesh, in_specs=(tok, tok, tok, w_in, w_out), out_specs=tok)
    return body(x.astype(dtype), weights, expert_ids, gate_up, down)[:N]


def _sharded_body(x, weights, expert_ids, gate_up, down, *, n_ep, psum_axis, dtype, transport, varying,
                  capacity_factor):
    """Per device: x [n,D], weights/ids [n,K] global expert ids, gate_up [E/P,D,2,F/T], down [E/P,F/T,D]
    (T: the tensor axis, when it splits F)."""
    if n_ep == 1:
        out = _local(x, weights, expert_ids, gate_up, down)
    elif transport == "gather":  # fp32 while a tensor-split partial sum is still to come
        out = _gathered(x, weights, expert_ids, gate_up, down, n_ep, capacity_factor,
                        jnp.float32 if psum_axis is not None else dtype)
    else:  # rows sorted by expert, so by the device that owns it
        N, K = expert_ids.shape
        p = place(expert_ids.reshape(N * K), gate_up.shape[0] * n_ep, 0)
        xs = gather(x, p, K)
        y = _exchange(xs.rows, xs.sizes, gate_up, down, n_ep, transport, varying, capacity_factor)
        out = combine(xs._replace(rows=y), weights, p)
    if psum_axis is not None:  # F split over tensor: each device holds a partial sum
        out = jax.lax.psum(out, psum_axis)
    return out.astype(dtype)


def _gathered(x, weights, expert_ids, gate_up, down, n_ep, capacity_factor, out_dtype):
    """The "gather" transport, per device: x [n,D], weights/expert_ids [n,K] (global ids),
    gate_up [E_l,D,2,F], down [E_l,F,D]. Every device takes all tokens of the expert axis
    (all_gather), runs its own experts on the assignments routed to them and returns each
    token's partial sum to its device (psum_scatter). Each token crosses to a device once, not
    once per expert there.

    The grouped rows have room for every gathered assignment, or with a capacity factor c > 0
    for c x the balanced share, taking a `lax.cond` branch with full room when more are local.
    Returns my tokens' sums [n,D] in `out_dtype`.
    """
    E_l = gate_up.shape[0]
    xa, wa, ids = (jax.lax.all_gather(a, "expert", tiled=True) for a in (x, weights, expert_ids))  # [P*n,...]
    N, K = ids.shape
    local = ids.reshape(N * K) - jax.lax.axis_index("expert") * E_l
    local = jnp.where((local >= 0) & (local < E_l), local, E_l)  # E_l: another device's expert, placed nowhere
    block = expert_block(N * K // n_ep, E_l)  # blocks sized for a balanced share

    def experts(rows):  # the local experts with room for `rows` grouped rows
        return lambda xa, wa, gate_up, down: _placed(xa, wa, place(local, E_l, block, rows), gate_up, down)

    full = N * K - block if block else N * K
    cap = min(capacity_rows(N * K, n_ep, capacity_factor), full)
    y = _by_capacity((local < E_l).sum() <= cap, cap, full, experts, xa, wa, gate_up, down)  # [N,D] fp32
    return _sum_scatter(y, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sum_scatter(y: jax.Array, dtype) -> jax.Array:
    """Partial sums y [P*n,D] fp32 -> my tokens' totals [n,D] in `dtype` (psum_scatter over the
    expert axis). The gradient all-gathers the cotangent in `dtype`, not after a cast to fp32:
    half the bytes, same values."""
    return jax.lax.psum_scatter(y, "expert", tiled=True).astype(dtype)


def _sum_scatter_fwd(y, dtype):
    return _sum_scatter(y, dtype), None


def _sum_scatter_bwd(dtype, _, g):
    return (jax.lax.all_gather(g, "expert", tiled=True).astype(jnp.float32),)


_sum_scatter.defvjp(_sum_scatter_fwd, _sum_scatter_bwd)


def _exclusive_cumsum(a: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.cumsum(a, axis=axis) - a


def _exchange(xs, counts, gate_up, down, n_ep, transport, varying, capacity_factor):
    """Sorted rows xs [R,D] with per-expert counts [E] -> expert outputs for those rows [R,D].

    sent[q, p] = rows device q sends to device p; mine[q, e] = rows from q for my expert e.
    """
    E_l = gate_up.shape[0]
    me = jax.lax.axis_index("expert")
    all_counts = jax.lax.all_gather(counts, "expert").astype(jnp.int32)  # [P,E]
    per_dst = all_counts.reshape(n_ep, n_ep, E_l)  # [src,dst,local expert]
    sent = per_dst.sum(-1)  # [P,P]
    mine = jnp.take(per_dst, me, axis=1)  # [P,E_l]
    R = xs.shape[0]
    block = expert_block(R, E_l)  # each device receives R rows when the routing is balanced
    if transport == "ragged":
        return _experts_on_arrival(_ragged(xs, sent, me, varying), mine, gate_up, down, block)
    cap = capacity_rows(R, n_ep, capacity_factor)
    through = lambda rows: lambda xs, gate_up, down: _experts_on_arrival(_dense(xs, sent, me, rows), mine,
                                                                        gate_up, down, block)
    return _by_capacity(sent.max() <= cap, cap, R, through, xs, gate_up, down)


def _by_capacity(fits, cap: int, full: int, run, *args):
    """run(cap)(*args) when `fits`, else run(full)(*args): a `lax.cond`, or no branch when cap == full."""
    if cap == full:
        return run(full)(*args)
    return jax.lax.cond(fits, run(cap), run(full), *args)


def capacity_rows(rows: int, n_ep: int, factor: float) -> int:
    """Rows of the capacity branch (the dense transport's device-pair blocks, the gather
    transport's expert rows): `factor` times the balanced share rows / n_ep, rounded up to a
    multiple of 8; `rows` (no branch) when that is not smaller or the factor is 0."""
    cap = -(-math.ceil(factor * rows / n_ep) // 8) * 8
    return rows if factor == 0 or cap >= rows else cap


def _experts_on_arrival(moved, mine, gate_up, down, block):
    """(received rows [n,D], send_back, block starts) -> expert outputs sent back to their
    devices: laid out by local expert, SwiGLU, back in arrival order, sent back."""
    recv, send_back, starts = moved
    p = place(_local_expert_ids(starts, mine, recv.shape[0]), gate_up.shape[0], block)  # padding: nowhere, 0 out
    return send_back(scatter(expert_ffn(gather(recv, p), gate_up, down), p))


def _local_expert_ids(starts: jax.Array, mine: jax.Array, n_rows: int) -> jax.Array:
    """Local expert of each received row (E_l for padding): the block from source q starts at
    starts[q] and holds mine[q, e] rows for expert e, in expert order."""
    r = jnp.arange(n_rows)
    src = jnp.searchsorted(starts, r, side="right") - 1  # [rows]
    within = r - starts[src]
    ends = jnp.cumsum(mine, axis=1)[src]  # [rows,E_l]
    return (within[:, None] >= ends).sum(-1)


def _ragged(xs, sent, me, varying):
    """ragged_all_to_all: received rows packed by source in a [P*R, D] buffer."""
    R = xs.shape[0]
    P = sent.shape[0]
    send_sizes, recv_sizes = sent[me], sent[:, me]
    plan = (_exclusive_cumsum(send_sizes), send_sizes,
            _exclusive_cumsum(sent, axis=0)[me],  # where my rows start in each receiver's buffer
            _exclusive_cumsum(recv_sizes), recv_sizes,
            _exclusive_cumsum(sent, axis=1)[:, me])  # where each source's rows to me started
    recv = _ragged_move(xs, plan, (R, P * R), varying)
    return recv, lambda y: _ragged_move(y, _reverse(plan), (P * R, R), varying), plan[3]


def _reverse(plan):
    send_off, send_sizes, remote_off, recv_off, recv_sizes, back_off = plan
    return recv_off, recv_sizes, back_off, send_off, send_sizes, remote_off


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _ragged_move(x, plan, rows, varying):
    """Rows of x [rows[0], D] to their devices, landing in a [rows[1], D] buffer.

    `varying`: the mesh axes x differs over (the token axes), which the new buffer takes on.

    plan = (send_off, send_sizes, remote_off, recv_off, recv_sizes, back_off). The gradient is
    the same move reversed (a permutation's transpose), written out rather than left to
    ragged_all_to_all's own transpose rule.
    """
    send_off, send_sizes, remote_off, _, recv_sizes, _ = plan
    out = jax.lax.pcast(jnp.zeros((rows[1],) + x.shape[1:], x.dtype), varying, to="varying")  # varies like x
    return jax.lax.ragged_all_to_all(x, out, send_off, send_sizes, remote_off, recv_sizes, axis_name="expert")


def _ragged_move_fwd(x, plan, rows, varying):
    return _ragged_move(x, plan, rows, varying), plan


def _ragged_move_bwd(rows, varying, plan, g):
    return _ragged_move(g, _reverse(plan), rows[::-1], varying), None


_ragged_move.defvjp(_ragged_move_fwd, _ragged_move_bwd)


def _dense(xs, sent, me, block: int):
    """all_to_all of a [P*block, D] buffer: block p, row i holds my i-th row for device p
    (every sent[q, p] <= block: the caller's branch guarantees it).

    My rows for device p are the contiguous run xs[first[p] : first[p] + sent[me, p]] (xs is
    sorted by expert, experts by device), so the buffer is a gather of xs, and so is its gradient.
    """
    R = xs.shape[0]
    P = sent.shape[0]
    send_sizes = sent[me]
    first = _exclusive_cumsum(send_sizes)  # [P]
    j = jnp.arange(block, dtype=jnp.int32)
    source = jnp.where(j[None, :] < send_sizes[:, None], first[:, None] + j[None, :], R)  # [P,block]; R: zero row
    source = source.reshape(P * block)
    i = jnp.arange(R, dtype=jnp.int32)
    dest = jnp.searchsorted(jnp.cumsum(send_sizes), i, side="right")  # [R] device of each of my rows
    slot = (dest * block + i - first[dest]).astype(jnp.int32)  # [R] its place in the buffer
    recv = jax.lax.all_to_all(take_rows(xs, source, slot), "expert", 0, 0, tiled=True)  # block q: from device q

    def send_back(y):
        return take_rows(jax.lax.all_to_all(y, "expert", 0, 0, tiled=True), slot, source)

    return recv, send_back, jnp.arange(P) * block
