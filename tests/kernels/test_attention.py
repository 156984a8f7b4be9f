import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import parallel
from dsv3_jax.kernels.attention import document_starts, dot_product_attention


def reference(q, k, v, mask, scale):
    """float64 NumPy softmax attention."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bthk,bshk->bhts", q, k) * scale
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhts,bshk->bthk", p / p.sum(-1, keepdims=True), v)


def test_document_starts_mark_each_runs_first_token():
    seg = np.array([[1, 1, 2, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5], [1, 2, 1, 1, 2, 2, 2, 0]])
    want = [[0, 0, 2, 2, 2, 5, 6, 6], [0] * 8, [0, 1, 2, 2, 4, 4, 4, 7]]
    np.testing.assert_array_equal(document_starts(jnp.asarray(seg)), want)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("H", [2, 3])  # 3 heads do not split over tensor=2: the partitioner's path
def test_attention_under_a_mesh_matches_numpy(masked, H):
    """Batch over data x expert, heads over tensor: each device attends over its own rows and
    heads; heads that do not split leave it to the partitioner. Output and gradients as
    without a mesh."""
    rs = np.random.RandomState(0)
    B, T, K, Kv = 4, 8, 6, 4
    q, k = (jnp.asarray(rs.randn(B, T, H, K), jnp.float32) for _ in range(2))
    v = jnp.asarray(rs.randn(B, T, H, Kv), jnp.float32)
    causal = np.tril(np.ones((T, T), bool))[None, None]
    seg = np.cumsum(rs.rand(B, T) < 0.3, axis=1)  # packed documents of random lengths
    starts = document_starts(jnp.asarray(seg)) if masked else None
    loss = lambda q, k, v: (dot_product_attention(q, k, v, starts, 0.5, impl="xla") ** 2).sum()
    want_out = reference(q, k, v, causal & (seg[:, None, :, None] == seg[:, None, None, :]) if masked else causal, 0.5)
    want_grads = jax.grad(loss, (0, 1, 2))(q, k, v)  # no mesh

    mesh = parallel.make_mesh("data=2,expert=2,tensor=2")
    with jax.set_mesh(mesh):
        f = jax.jit(lambda q, k, v: (dot_product_attention(q, k, v, starts, 0.5, impl="xla"),
                                     jax.grad(loss, (0, 1, 2))(q, k, v)))
        out, grads = f(q, k, v)
        jaxpr = str(jax.make_jaxpr(f)(q, k, v))
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert ("shard_map" in jaxpr) == (H == 2)  # per device only where every mesh axis splits it
