import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.optimizer import decay_mask, make_optimizer


def _params():
    rs = np.random.RandomState(0)
    return {"attn": {"q_proj": {"kernel": jnp.asarray(rs.randn(2, 4, 3), jnp.float32)}},
            "attn_norm": {"scale": jnp.asarray(1 + rs.randn(2, 4), jnp.float32)}}


def test_decay_skips_norm_scales_even_when_stacked_2d():
    assert decay_mask(_params()) == {"attn": {"q_proj": {"kernel": True}}, "attn_norm": {"scale": False}}


def test_matches_optax_adamw_with_clipping():
    c = TrainConfig(moments_dtype="float32")  # optax keeps fp32 moments
    lr = 1e-2
    params = _params()
    ours = make_optimizer(c)
    ref = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=decay_mask))
    s_ours, s_ref, p_ours, p_ref = ours.init(params), ref.init(params), params, params
    rs = np.random.RandomState(1)
    for _ in range(4):
        g = jax.tree.map(lambda p: jnp.asarray(rs.randn(*p.shape) * 3, jnp.float32), params)
        u, s_ours = ours.update(g, s_ours, p_ours)
        p_ours = jax.tree.map(lambda p, u: p - lr * u, p_ours, u)
        u, s_ref = ref.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_moments_match_adamw_that_rounds_its_stored_moments():
    """The default (the paper's BF16 m and v) against a NumPy AdamW whose steps use the fresh
    fp32 moments and store them rounded to bf16."""
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.95, 1e-8, 0.1
    params = _params()
    ours = make_optimizer(TrainConfig())
    state, p_ours = ours.init(params), params
    p_ref = jax.tree.map(np.asarray, params)
    decay = decay_mask(params)
    m = jax.tree.map(np.zeros_like, p_ref)
    v = jax.tree.map(np.zeros_like, p_ref)
    to_bf16 = lambda a: a.astype(jnp.bfloat16).astype(np.float32)
    rs = np.random.RandomState(1)
    for t in range(1, 5):
        g = jax.tree.map(lambda p: (rs.randn(*p.shape) * 3).astype(np.float32), p_ref)
        u, state = ours.update(jax.tree.map(jnp.asarray, g), state, p_ours)
        p_ours = jax.tree.map(lambda p, u: p - lr * u, p_ours, u)
        norm = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in jax.tree.leaves(g)))
        g = jax.tree.map(lambda x: x * np.float32(min(1.0, 1.0 / norm)), g)
        m_new = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v_new = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        step = lambda m, v, p, d: (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + (wd * p if d else 0)
        p_ref = jax.tree.map(lambda p, m, v, d: p - lr * step(m, v, p, d), p_ref, m_new, v_new, decay)
        m, v = jax.tree.map(to_bf16, m_new), jax.tree.map(to_bf16, v_new)
    adam = state[1]
    for ours_, ref in ((adam.mu, m), (adam.nu, v)):
        for a, b in zip(jax.tree.leaves(ours_), jax.tree.leaves(ref)):
            assert a.dtype == jnp.bfloat16
            np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2 ** -8)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_moments_are_stored_in_bf16():
    state = make_optimizer(TrainConfig(moments_dtype="bfloat16")).init(_params())
    adam = state[1]
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
