import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import parallel
from dsv3_jax.kernels.attention import dot_product_attention


def reference(q, k, v, mask, scale):
    """float64 NumPy softmax attention."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bthk,bshk->bhts", q, k) * scale
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhts,bshk->bthk", p / p.sum(-1, keepdims=True), v)


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
    mask = jnp.asarray(causal & (rs.rand(B, 1, T, T) > 0.3) | np.eye(T, dtype=bool)) if masked else None
    loss = lambda q, k, v: (dot_product_attention(q, k, v, mask, 0.5, impl="xla") ** 2).sum()
    want_out = reference(q, k, v, causal if mask is None else mask, 0.5)
    want_grads = jax.grad(loss, (0, 1, 2))(q, k, v)  # no mesh

    mesh = parallel.make_mesh("data=2,expert=2,tensor=2")
    with jax.set_mesh(mesh):
        f = jax.jit(lambda q, k, v: (dot_product_attention(q, k, v, mask, 0.5, impl="xla"),
                                     jax.grad(loss, (0, 1, 2))(q, k, v)))
        out, grads = f(q, k, v)
        jaxpr = str(jax.make_jaxpr(f)(q, k, v))
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert ("shard_map" in jaxpr) == (H == 2)  # per device only where every mesh axis splits it
