import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.train.losses import chunked_cross_entropy, shifted_targets


def test_chunked_cross_entropy_equals_full_softmax_in_value_and_gradient():
    rs = np.random.RandomState(0)
    N, D, V = 37, 16, 103  # V not a multiple of the chunk
    h, w = jnp.asarray(rs.randn(N, D), jnp.float32), jnp.asarray(rs.randn(D, V), jnp.float32)
    targets = jnp.asarray(rs.randint(0, V, N))
    mask = jnp.asarray(rs.rand(N) > 0.2)

    def full(h, w):
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[:, None], -1)[:, 0]
        return jnp.where(mask, nll, 0).sum() / mask.sum()

    def chunked(h, w):
        return chunked_cross_entropy(h, w, targets, mask, chunk=16, dtype=jnp.float32)[0]

    np.testing.assert_allclose(chunked(h, w), full(h, w), rtol=1e-5)
    for a, b in zip(jax.grad(chunked, (0, 1))(h, w), jax.grad(full, (0, 1))(h, w)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert int(chunked_cross_entropy(h, w, targets, mask, chunk=16, dtype=jnp.float32)[1]) == int(mask.sum())


def test_targets_shift_and_mask_by_hand():
    tokens = jnp.asarray([[10, 11, 12, 13, 20, 21, 0, 0]])
    seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 0, 0]])  # two documents, then padding
    # next token (shift 1, the LM loss)
    t, v = shifted_targets(tokens, seg, 1, same_document=True)
    np.testing.assert_array_equal(t[0, :5], [11, 12, 13, 20, 21])
    np.testing.assert_array_equal(v[0], [1, 1, 1, 0, 1, 0, 0, 0])
    # MTP depth 1 predicts two ahead (shift 2)
    t, v = shifted_targets(tokens, seg, 2, same_document=True)
    np.testing.assert_array_equal(t[0, :4], [12, 13, 20, 21])
    np.testing.assert_array_equal(v[0], [1, 1, 0, 0, 0, 0, 0, 0])
    # without document masking only padding and the end of the row stop a target
    _, v = shifted_targets(tokens, seg, 2, same_document=False)
    np.testing.assert_array_equal(v[0], [1, 1, 1, 1, 0, 0, 0, 0])
