import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.train.losses import chunked_cross_entropy, shifted_targets


@pytest.mark.parametrize("chunk", [16, 64])  # three chunks (the last one short); one chunk
def test_chunked_cross_entropy_equals_full_softmax_in_value_and_gradient(chunk):
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
        return chunked_cross_entropy(h, w, targets, mask, chunk=chunk, dtype=jnp.float32)[0]

    np.testing.assert_allclose(chunked(h, w), full(h, w), rtol=1e-5)
    value, grads = jax.value_and_grad(chunked, (0, 1))(h, w)  # the forward pass that also forms gradients
    np.testing.assert_allclose(value, full(h, w), rtol=1e-5)
    for a, b in zip(grads, jax.grad(full, (0, 1))(h, w)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert int(chunked_cross_entropy(h, w, targets, mask, chunk=chunk, dtype=jnp.float32)[1]) == int(mask.sum())


def test_cross_entropy_of_huge_logits_matches_float64_numpy():
    """Logits in the thousands: the one-pass log-sum-exp neither overflows nor loses the max; a
    row of equal logits (h = 0) takes the combine's tie."""
    rs = np.random.RandomState(2)
    N, D, V = 20, 8, 50
    h, w = rs.randn(N, D), rs.randn(D, V) * 300
    h[3] = 0
    targets = rs.randint(0, V, N)
    logits = h @ w
    top = logits.max(-1)
    expected = np.mean(top + np.log(np.exp(logits - top[:, None]).sum(-1)) - logits[np.arange(N), targets])
    loss, _ = chunked_cross_entropy(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(targets),
                                    jnp.ones((N,), bool), chunk=8, dtype=jnp.float32)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_bf16_cross_entropy_stays_near_float32():
    """bf16 operands with fp32 accumulation: loss and gradients within bf16 rounding of fp32."""
    rs = np.random.RandomState(1)
    N, D, V = 40, 32, 300
    h, w = jnp.asarray(rs.randn(N, D), jnp.float32), jnp.asarray(rs.randn(D, V) * 0.2, jnp.float32)
    targets, mask = jnp.asarray(rs.randint(0, V, N)), jnp.ones((N,), bool)
    loss = lambda dtype: lambda h, w: chunked_cross_entropy(h, w, targets, mask, chunk=16, dtype=dtype)[0]
    (v16, g16), (v32, g32) = (jax.value_and_grad(loss(d), (0, 1))(h, w) for d in (jnp.bfloat16, jnp.float32))
    np.testing.assert_allclose(v16, v32, rtol=1e-2)
    for a, b in zip(g16, g32):
        assert float(jnp.abs(a - b).max()) < 2e-2 * float(jnp.abs(b).max())


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
