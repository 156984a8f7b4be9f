import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.rope import apply_rope, apply_rope_tail, rope_cos_sin, rope_frequencies
from tests.hf_reference import hf_config, t2n

YARN_CASES = [
    ModelConfig.preset("v3_671b"),
    ModelConfig.preset("tiny"),
    ModelConfig.preset("tiny", qk_rope_head_dim=16, rope_scaling={
        "type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16,
        "beta_slow": 2, "mscale": 0.7, "mscale_all_dim": 1.0}),
]


@pytest.mark.parametrize("config", YARN_CASES, ids=["671b", "tiny", "tiny-mscale"])
def test_yarn_frequencies_and_multiplier_match_hf(config):
    ref_freq, ref_mult = ROPE_INIT_FUNCTIONS["yarn"](hf_config(config))
    freq, mult = rope_frequencies(config)
    np.testing.assert_allclose(freq, t2n(ref_freq), rtol=1e-6)
    assert mult == pytest.approx(ref_mult, rel=1e-12)


def test_671b_yarn_ramp_and_softmax_scale_match_spec():
    """SPEC B: pairs 0-10 keep f_j, 23-31 use f_j/40; scale = 192^-0.5 * (0.1 ln 40 + 1)^2."""
    config = ModelConfig.preset("v3_671b")
    freq, mult = rope_frequencies(config)
    base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(freq[:11], base[:11], rtol=1e-6)
    np.testing.assert_allclose(freq[23:], base[23:] / 40, rtol=1e-6)
    assert np.all((freq[11:23] < base[11:23]) & (freq[11:23] > base[11:23] / 40))
    assert mult == 1.0
    assert config.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    assert config.softmax_scale == pytest.approx(0.1352338, abs=1e-7)


def test_no_scaling_is_plain_rope():
    config = ModelConfig.preset("small")
    freq, mult = rope_frequencies(config)
    np.testing.assert_allclose(freq, 10000.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)
    assert mult == 1.0 and config.softmax_scale == pytest.approx(48 ** -0.5)


def test_rotary_matches_hf_interleave_up_to_its_output_permutation():
    config = ModelConfig.preset("tiny")
    rs = np.random.RandomState(0)
    B, T, H, Kr = 2, 100, 3, config.qk_rope_head_dim  # T > original_max_position_embeddings (64)
    q, k = rs.randn(B, H, T, Kr).astype(np.float32), rs.randn(B, 1, T, Kr).astype(np.float32)
    pos = np.stack([np.arange(T), np.arange(T) + 37])
    rot = hf.DeepseekV3RotaryEmbedding(hf_config(config))
    cos_t, sin_t = rot(torch.tensor(q), torch.tensor(pos))
    q_ref, k_ref = hf.apply_rotary_pos_emb_interleave(torch.tensor(q), torch.tensor(k), cos_t, sin_t)
    cos, sin = rope_cos_sin(config, jnp.asarray(pos))
    q_ours = np.asarray(apply_rope(jnp.asarray(q.transpose(0, 2, 1, 3)), cos, sin)).transpose(0, 2, 1, 3)
    k_ours = np.asarray(apply_rope(jnp.asarray(k[:, 0]), cos, sin))[:, None]
    # HF emits [even outputs ; odd outputs]; we keep the pairs interleaved.
    half = Kr // 2
    for ours, ref in ((q_ours, t2n(q_ref)), (k_ours, t2n(k_ref))):
        np.testing.assert_allclose(ours[..., 0::2], ref[..., :half], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours[..., 1::2], ref[..., half:], rtol=1e-5, atol=1e-5)
    # And so the scores, which is what attention sees, agree directly.
    np.testing.assert_allclose(q_ours @ k_ours.swapaxes(-1, -2), t2n(q_ref @ k_ref.transpose(-1, -2)),
                               rtol=1e-4, atol=1e-4)


def test_rope_tail_rotates_the_last_entries_and_its_gradient_is_autodiffs():
    """`apply_rope_tail` equals the split / rotate / join it replaces, value and gradient (the
    reference is automatic differentiation of that form), in fp32 and bf16."""
    config = ModelConfig.preset("tiny")
    Kr = config.qk_rope_head_dim
    cos, sin = rope_cos_sin(config, jnp.arange(7)[None, :] + jnp.arange(2)[:, None] * 3)
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jax.random.normal(jax.random.key(0), (2, 7, 3, 8 + Kr), dtype)
        g = jax.random.normal(jax.random.key(1), x.shape, dtype)
        split = lambda x: jnp.concatenate([x[..., :8], apply_rope(x[..., 8:], cos, sin)], axis=-1)
        y, vjp = jax.vjp(lambda x: apply_rope_tail(x, cos, sin), x)
        y_ref, vjp_ref = jax.vjp(split, x)
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
        np.testing.assert_allclose(np.asarray(vjp(g)[0], np.float32), np.asarray(vjp_ref(g)[0], np.float32),
                                   rtol=1e-6 if dtype == jnp.float32 else 2 ** -8, atol=1e-6)
