"""The routed experts' dispatch and combine, both implementations, against NumPy.

The placement has empty rows (src = N*K), assignments on no row (dest = R, as for padding tokens
or rows in blocks), a token count that is not a multiple of the kernels' row blocks and a width
that is not a multiple of their column blocks. "pallas" runs its kernels in interpret mode here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import kernels
from dsv3_jax.kernels import row_gather

N, K, D = 37, 3, 48


def _placement(k=K):
    """A random placement of N*k assignments on R = N*k + 5 rows, 4 assignments on none."""
    rs = np.random.RandomState(0)
    M, R = N * k, N * k + 5
    dest = rs.permutation(R)[:M].astype(np.int32)
    dest[rs.choice(M, 4, replace=False)] = R
    src = np.full(R, M, np.int32)
    placed = dest < R
    src[dest[placed]] = np.arange(M)[placed]
    return src, dest


@pytest.mark.parametrize("impl", row_gather.IMPLS)
@pytest.mark.parametrize("k", [K, 6])  # 6: the kernels check a program's share of rows in two pieces
def test_dispatch_and_combine_match_numpy(impl, k):
    src, dest = _placement(k)
    M, R = N * k, src.shape[0]
    rs = np.random.RandomState(1)
    x, rows = rs.randn(N, D).astype(np.float32), rs.randn(R, D).astype(np.float32)
    w = rs.rand(N, k).astype(np.float32)
    g_rows, g_out = rs.randn(R, D).astype(np.float32), rs.randn(N, D).astype(np.float32)

    def f(x, rows, w):
        with kernels.use(row_gather=impl):
            return (row_gather.dispatch(x, k, jnp.asarray(src), jnp.asarray(dest)),
                    row_gather.combine(rows, w, jnp.asarray(src), jnp.asarray(dest)))

    (got_rows, got_out), vjp = jax.vjp(jax.jit(f), jnp.asarray(x), jnp.asarray(rows), jnp.asarray(w))
    dx, drows, dw = vjp((jnp.asarray(g_rows), jnp.asarray(g_out)))

    tok = np.where(src < M, src // k, -1)  # each row's token, -1: empty
    want_rows = np.where((tok >= 0)[:, None], x[np.maximum(tok, 0)], 0)
    at = lambda a, i: np.where((i < a.shape[0])[..., None], a[np.minimum(i, a.shape[0] - 1)], 0)
    slot_rows = at(rows, dest.reshape(N, k))  # [N,k,D]
    want_out = (w[..., None] * slot_rows).sum(1)
    want_dx = at(g_rows, dest.reshape(N, k)).sum(1)
    w_of_row = np.where(src < M, w.reshape(-1)[np.minimum(src, M - 1)], 0)
    want_drows = w_of_row[:, None] * np.where((tok >= 0)[:, None], g_out[np.maximum(tok, 0)], 0)
    want_dw = (slot_rows * g_out[:, None, :]).sum(-1)

    np.testing.assert_array_equal(got_rows, want_rows)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(drows, want_drows, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)
    assert (np.asarray(dw).reshape(-1)[dest == R] == 0).all()  # assignments on no row: exactly zero


def test_bf16_rows_keep_their_dtype_and_sum_in_fp32():
    """bf16 rows: both dispatches move them bitwise and both combines sum in fp32 alike; both
    dispatch gradients sum a token's K slots in fp32 and round once."""
    src, dest = (jnp.asarray(a) for a in _placement())
    rs = np.random.RandomState(2)
    x = jnp.asarray(rs.randn(N, D), jnp.bfloat16)
    rows = jnp.asarray(rs.randn(src.shape[0], D), jnp.bfloat16)
    w = jnp.asarray(rs.rand(N, K), jnp.float32)
    g = jnp.asarray(rs.randn(src.shape[0], D), jnp.bfloat16)
    dispatch = jax.jit(row_gather.dispatch, static_argnums=(1, 4))
    combine = jax.jit(row_gather.combine, static_argnums=4)
    moved = dispatch(x, K, src, dest, "pallas")
    assert moved.dtype == jnp.bfloat16
    np.testing.assert_array_equal(moved, dispatch(x, K, src, dest, "xla"))
    np.testing.assert_array_equal(combine(rows, w, src, dest, "pallas"), combine(rows, w, src, dest, "xla"))
    slots = np.concatenate([np.asarray(g, np.float32), np.zeros((1, D), np.float32)])[np.asarray(dest).reshape(N, K)]
    for impl in row_gather.IMPLS:
        moved_like = jax.jit(lambda x, impl=impl: row_gather.dispatch(x, K, src, dest, impl))
        dx = jax.vjp(moved_like, x)[1](g)[0]
        assert dx.dtype == jnp.bfloat16
        np.testing.assert_array_equal(dx, jnp.asarray(slots.sum(1)).astype(jnp.bfloat16), err_msg=impl)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="row_gather impl 'megablox'"):
        row_gather.dispatch(jnp.zeros((2, 4)), 1, jnp.arange(2), jnp.arange(2), impl="megablox")
    with pytest.raises(ValueError, match="row_gather impl"):
        kernels.validate("row_gather", "megablox")
