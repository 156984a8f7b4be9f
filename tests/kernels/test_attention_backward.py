import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.kernels import attention_backward as ab


def reference_grads(q, k, v, g, scale):
    """float64 NumPy gradients of causal softmax attention, with its output and log-sum-exp."""
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
    T = q.shape[1]
    s = np.einsum("bthk,bshk->bhts", q, k) * scale
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)  # [B,H,T]
    p = np.exp(s - lse[..., None])
    out = np.einsum("bhts,bshk->bthk", p, v)
    dv = np.einsum("bhts,bthk->bshk", p, g)
    dp = np.einsum("bthk,bshk->bhts", g, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bhts,bshk->bthk", ds, k) * scale
    dk = np.einsum("bhts,bthk->bshk", ds, q) * scale
    return (dq, dk, dv), out, lse


def test_takes_only_the_shapes_it_was_built_for():
    q, v = jnp.ones((1, 256, 2, 192), jnp.bfloat16), jnp.ones((1, 256, 2, 128), jnp.bfloat16)
    assert ab.takes(q, v)
    assert not ab.takes(q.astype(jnp.float32), v)  # the products run in bf16/fp16
    assert not ab.takes(q[:, :200], v[:, :200])  # T not a multiple of the 128-key blocks
    assert not ab.takes(q[..., :96], v)  # a head dim off the 64-column tiles
    assert not ab.takes(jnp.ones((1, 256, 2, 256), jnp.bfloat16), v)  # K + Kv over the registers


@pytest.mark.parametrize("k_parts", [(128, 64), (112, 80)])
def test_backward_matches_numpy_in_gpu_interpret_mode(gpu_interpret_mode, monkeypatch, k_parts):
    """Both kernels under Pallas' GPU interpreter at 256 tokens (two key blocks, the masked
    diagonal tiles and an unmasked one), two heads in two chunks (a dS^T budget of one head),
    MLA's 192/128 head dims, against float64 NumPy; dk in MLA's two parts, which the kernel
    writes on their own, or in parts off its 64-column tiles, written whole and sliced."""
    monkeypatch.setattr(ab, "DS_BUDGET", 256 * 256 * 2)
    rs = np.random.RandomState(0)
    B, T, H, scale = 1, 256, 2, 192 ** -0.5
    q, k = (rs.randn(B, T, H, 192).astype(jnp.bfloat16) for _ in range(2))
    v, g = (rs.randn(B, T, H, 128).astype(jnp.bfloat16) for _ in range(2))
    want, out, lse = reference_grads(q, k, v, g, scale)
    got = ab.backward(*(jnp.asarray(a) for a in (q, k, v, out.astype(jnp.bfloat16))),
                      jnp.asarray(lse, jnp.float32), jnp.asarray(g), scale, k_parts)
    dq, dks, dv = got
    assert [a.shape[-1] for a in dks] == list(k_parts)
    for name, a, b in zip(("dq", "dk", "dv"), (dq, jnp.concatenate(dks, axis=-1), dv), want):
        assert a.dtype == jnp.bfloat16 and a.shape == b.shape, name
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=0, atol=np.abs(b).max() * 2 ** -7, err_msg=name)


def test_backward_refuses_parts_that_are_not_k():
    q = jnp.ones((1, 128, 1, 192), jnp.bfloat16)
    v = jnp.ones((1, 128, 1, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="k_parts"):
        ab.backward(q, q, v, v, jnp.zeros((1, 1, 128)), v, 0.1, (128, 128))
