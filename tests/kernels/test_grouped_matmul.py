import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.kernels import grouped_matmul as gm
from dsv3_jax.kernels.grouped_matmul import grouped_matmul, row_tasks


def reference(x, w, sizes):
    """Per-group numpy matmul in float64; rows past the groups are zero."""
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for e, n in enumerate(sizes):
        out[start:start + n] = x[start:start + n].astype(np.float64) @ w[e].astype(np.float64)
        start += n
    return out


@pytest.mark.parametrize("impl", ["ragged", "tiled"])
@pytest.mark.parametrize("sizes", [[5, 0, 17, 3, 0, 40], [0, 0, 0, 0, 0, 64], [1] * 6, [30, 0, 0, 0, 0, 0]])
def test_grouped_matmul_matches_per_group_products(impl, sizes):
    rs = np.random.RandomState(0)
    M, K, N = 70, 12, 9  # M > sum(sizes) in most cases: trailing rows must be zero
    x, w = rs.randn(M, K).astype(np.float32), rs.randn(len(sizes), K, N).astype(np.float32)
    got = grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes), impl=impl, tile=16)
    np.testing.assert_allclose(got, reference(x, w, sizes), rtol=1e-5, atol=1e-5)


def test_tiled_gradients_equal_ragged_dot_gradients():
    rs = np.random.RandomState(1)
    x, w = jnp.asarray(rs.randn(50, 8), jnp.float32), jnp.asarray(rs.randn(4, 8, 6), jnp.float32)
    sizes = jnp.asarray([7, 0, 30, 10])

    def grads(impl):
        return jax.grad(lambda x, w: (grouped_matmul(x, w, sizes, impl=impl, tile=8) ** 2).sum(), (0, 1))(x, w)

    for a, b in zip(grads("tiled"), grads("ragged")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", ["ragged", "tiled"])
def test_no_rows_give_no_rows_and_zero_weight_gradients(impl):
    x, w = jnp.zeros((0, 8)), jnp.ones((4, 8, 16))
    out, dw = jax.value_and_grad(lambda w: grouped_matmul(x, w, jnp.zeros((4,), jnp.int32), impl=impl).sum())(w)
    assert float(out) == 0.0 and dw.shape == w.shape and not np.asarray(dw).any()
    assert grouped_matmul(x, w, jnp.zeros((4,), jnp.int32), impl=impl).shape == (0, 16)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="grouped matmul impl 'cuda'"):
        grouped_matmul(jnp.ones((4, 2)), jnp.ones((2, 2, 3)), jnp.asarray([2, 2]), impl="cuda")


def test_tiled_weight_gradient_equals_autodiff():
    """The weight gradient the tokamax path uses (its own measured wrong on the H200)."""
    from dsv3_jax.kernels.grouped_matmul import _tiled_weight_grad

    rs = np.random.RandomState(2)
    x, g = jnp.asarray(rs.randn(60, 8), jnp.float32), jnp.asarray(rs.randn(60, 5), jnp.float32)
    sizes = jnp.asarray([9, 0, 31, 12, 0])
    w = jnp.zeros((5, 8, 5))
    _, vjp = jax.vjp(lambda w: grouped_matmul(x, w, sizes, impl="ragged"), w)
    np.testing.assert_allclose(_tiled_weight_grad(x, g, sizes, 5, 16, None), vjp(g)[0], rtol=1e-5, atol=1e-5)


def per_group_weight_grad(x, g, sizes):
    """dW[e] = x_e^T g_e in float64 NumPy, groups contiguous from row 0."""
    ends = np.cumsum(sizes)
    return np.stack([x[e - n:e].astype(np.float64).T @ g[e - n:e] for e, n in zip(ends, sizes)])


@pytest.mark.parametrize("sizes, n", [([70, 0, 131, 3, 0, 40], 128), ([0, 0, 0, 0, 0, 0], 128),
                                      ([300, 0, 0, 0, 0, 0], 128), ([70, 0, 131, 3, 0, 40], 256)])
def test_pallas_weight_gradient_matches_numpy(sizes, n):
    """The GPU weight-gradient kernel (run in Pallas interpret mode): unaligned group starts,
    empty groups, groups longer than one row block, and padding rows after the groups, with
    128- and 256-wide gradient blocks (N 128, 256); written in fp32 or rounded once to bf16
    (the weights' dtype) from the fp32 accumulator."""
    from dsv3_jax.kernels.grouped_matmul import _pallas_weight_grad

    rs = np.random.RandomState(3)
    x, g = rs.randn(300, 256).astype(np.float32), rs.randn(300, n).astype(np.float32)
    args = (jnp.asarray(x), jnp.asarray(g), jnp.asarray(sizes, jnp.int32), len(sizes), jax.lax.Precision.HIGHEST)
    want = per_group_weight_grad(x, g, sizes)
    np.testing.assert_allclose(_pallas_weight_grad(*args, interpret=True), want, rtol=1e-5, atol=1e-4)
    got = _pallas_weight_grad(*args, dtype=jnp.bfloat16, interpret=True)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2 ** -8, atol=1e-3)


def test_block_matmul_and_its_gradients_match_numpy():
    """The "blocks" layout's batched matmul: value and both gradients against float64 NumPy."""
    from dsv3_jax.kernels.grouped_matmul import block_matmul

    rs = np.random.RandomState(5)
    x, w, g = rs.randn(3, 7, 10), rs.randn(3, 10, 4), rs.randn(3, 7, 4)
    y, vjp = jax.vjp(block_matmul, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    dx, dw = vjp(jnp.asarray(g, jnp.float32))
    np.testing.assert_allclose(y, np.einsum("eck,ekn->ecn", x, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, np.einsum("ecn,ekn->eck", g, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum("eck,ecn->ekn", x, g), rtol=1e-5, atol=1e-5)


def test_block_rows_follow_the_layout():
    from dsv3_jax.kernels.grouped_matmul import BLOCK_FACTOR, block_rows

    assert block_rows(98304, 64, "blocks") == -(-int(np.ceil(BLOCK_FACTOR * 98304 / 64)) // 8) * 8
    assert block_rows(120, 16, "blocks") % 8 == 0 and block_rows(120, 16, "blocks") >= BLOCK_FACTOR * 120 / 16
    assert block_rows(98304, 64, "grouped") == 0
    with pytest.raises(ValueError, match="expert layout 'capacity': choose from"):
        block_rows(8, 2, "capacity")


def test_ragged_backward_products_take_bf16_operands():
    """The "ragged" impl's gradient runs both backward products on bf16 operands (fp32
    accumulation), not on the fp32 accumulator's cotangent; values match float64 NumPy."""
    rs = np.random.RandomState(4)
    x, w = rs.randn(40, 16).astype(np.float32), (rs.randn(3, 16, 8) * 0.3).astype(np.float32)
    sizes = [11, 0, 25]
    g = rs.randn(40, 8).astype(np.float32)
    xb, wb, gb = (jnp.asarray(a, jnp.bfloat16) for a in (x, w, g))

    def loss(x, w):
        return (grouped_matmul(x, w, jnp.asarray(sizes), impl="ragged").astype(jnp.float32) * gb).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(xb, wb)
    products = [e for e in jaxpr.eqns if e.primitive.name == "ragged_dot_general"]
    assert len(products) == 2  # dx and dW (the loss is linear in the product: no forward needed)
    assert all(v.aval.dtype == jnp.bfloat16 for e in products for v in e.invars[:2])
    dx, dw = jax.grad(loss, (0, 1))(xb, wb)
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (xb, wb, gb))  # the bf16-rounded inputs
    ends = np.cumsum(sizes)
    want_dx = np.zeros_like(x64)
    for e, (end, n) in enumerate(zip(ends, sizes)):
        want_dx[end - n:end] = g64[end - n:end] @ w64[e].T
    np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(dw, np.float64), per_group_weight_grad(x64, g64, sizes), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("block_m", [8, 32, 128])
def test_row_tasks_cover_every_grouped_row_once(block_m):
    """Each row of each group lies in exactly one task of its own group, among the first
    cdiv(M, block_m) + E - 1; rows past the groups in none, and the tasks after those are empty.
    Every case asks for the tasks of the largest M and E, so one compilation serves each E."""
    rs = np.random.RandomState(3)
    max_m, max_e = 400, 8
    tasks = jax.jit(row_tasks, static_argnums=(1, 2))
    all_tasks = -(-max_m // block_m) + max_e - 1
    for _ in range(40):
        E, M = rs.randint(1, max_e + 1), rs.randint(1, max_m)
        sizes = rs.multinomial(rs.randint(0, M + 1), np.ones(E) / E)  # at most M rows in all
        sizes[rs.randint(E)] = 0  # an empty group
        n_tasks = -(-M // block_m) + E - 1
        group, row0, offset, rows = map(np.asarray, tasks(jnp.asarray(sizes), block_m, all_tasks))
        assert not rows[n_tasks:].any()
        owner = np.full(M + block_m, -1)
        for t in range(n_tasks):
            assert row0[t] % 8 == 0 and offset[t] + rows[t] <= block_m
            span = slice(row0[t] + offset[t], row0[t] + offset[t] + rows[t])
            assert (owner[span] == -1).all()
            owner[span] = group[t]
        expected = np.concatenate([np.repeat(np.arange(E), sizes), np.full(M + block_m - sizes.sum(), -1)])
        np.testing.assert_array_equal(owner, expected)


@pytest.fixture
def gpu_interpreter(gpu_interpret_mode, monkeypatch):
    """Pallas' GPU interpreter on the CPU, two persistent programs sharing the tiles."""
    monkeypatch.setattr(gm, "_sm_count", lambda: 2)


@pytest.mark.parametrize("transposed", [False, True])
def test_hopper_kernel_matches_per_group_products_in_gpu_interpret_mode(gpu_interpreter, transposed):
    """The Hopper kernel's product and its transposed-weight form (persistent tile loop,
    warp-specialised pipeline, ragged row stores) run by Pallas' GPU interpreter on the CPU.
    Blocks reaching past the rows read NaN (uninitialised memory), so a row stored from the
    wrong task or block would show. K = 4 steps of 64: each program chains the pipelines of its
    tiles through every stage."""
    rs = np.random.RandomState(4)
    sizes = [100, 0, 150, 7]  # 257 of 300 rows: a group boundary inside a block, an empty group
    M, K, N = 300, 256, 256
    x = rs.randn(M, K).astype(jnp.bfloat16)
    w = (rs.randn(len(sizes), K, N) * 0.1).astype(jnp.bfloat16)
    w_in = np.swapaxes(w, 1, 2) if transposed else w  # [E, N, K]: the input gradient's layout
    got = gm._hopper_grouped_matmul(jnp.asarray(x), jnp.asarray(w_in), jnp.asarray(sizes), transposed=transposed)
    want = reference(x.astype(np.float32), w.astype(np.float32), sizes)[:sum(sizes)]
    got = np.asarray(got[:sum(sizes)], np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=np.abs(want).max() * 2 ** -7)


def test_hopper_weight_gradient_matches_numpy_in_gpu_interpret_mode(gpu_interpreter):
    """The Hopper weight-gradient kernel under the GPU interpreter: a 37-row group (its neighbour
    then starts off the 8-row grid), an empty group (a zero gradient), a group over several row
    blocks, two K and two N tiles, and NaN in the rows after the groups, which the blocks that
    straddle a group boundary must select away rather than multiply by zero."""
    rs = np.random.RandomState(6)
    sizes = [37, 0, 150, 100]  # 287 of 320 rows
    M, K, N = 320, 256, 512
    x, g = rs.randn(M, K).astype(np.float32), rs.randn(M, N).astype(np.float32)
    x[sum(sizes):], g[sum(sizes):] = np.nan, np.nan
    xb, gb = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
    got = gm._hopper_weight_grad(jnp.asarray(xb), jnp.asarray(gb), jnp.asarray(sizes), len(sizes), jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    want = per_group_weight_grad(xb.astype(np.float64), gb.astype(np.float64), sizes)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=np.abs(want).max() * 2 ** -8)
