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
    c = TrainConfig()
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


def test_bf16_moments_are_stored_in_bf16():
    state = make_optimizer(TrainConfig(moments_dtype="bfloat16")).init(_params())
    adam = state[1]
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
