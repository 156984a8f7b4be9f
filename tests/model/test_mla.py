import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

from dsv3_jax import fp8
from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels.attention import document_starts
from dsv3_jax.model.mla import MLA
from dsv3_jax.model.rope import rope_cos_sin
from tests.hf_reference import hf_config, randomize_, t2n

CASES = {
    "q-lora-yarn": ModelConfig.preset("tiny"),
    "direct-q-no-rope-scaling": ModelConfig.preset("tiny", q_lora_rank=None, rope_scaling=None),
    "wide-v": ModelConfig.preset("tiny", v_head_dim=24, num_attention_heads=3, num_key_value_heads=3,
                                qk_rope_head_dim=4),
}


def load_from_hf(ours: MLA, ref: hf.DeepseekV3Attention) -> None:
    names = {"q_proj": "q_proj", "q_a_proj": "q_a_proj", "q_b_proj": "q_b_proj", "kv_a_proj": "kv_a_proj_with_mqa",
             "kv_b_proj": "kv_b_proj", "o_proj": "o_proj"}
    for ours_name, ref_name in names.items():
        if getattr(ref, ref_name, None) is not None:
            getattr(ours, ours_name).kernel[...] = jnp.asarray(t2n(getattr(ref, ref_name).weight).T)
    if ref.q_a_layernorm is not None:
        ours.q_a_norm.scale[...] = jnp.asarray(t2n(ref.q_a_layernorm.weight))
    ours.kv_a_norm.scale[...] = jnp.asarray(t2n(ref.kv_a_layernorm.weight))


def run_both(config, x, positions):
    hfc = hf_config(config)
    torch.manual_seed(0)
    ref = hf.DeepseekV3Attention(hfc, layer_idx=0).eval()
    randomize_(ref, 1)
    ours = MLA(config, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    load_from_hf(ours, ref)
    T = x.shape[1]
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    cos_t, sin_t = hf.DeepseekV3RotaryEmbedding(hfc)(torch.tensor(x), torch.tensor(positions))
    expected, _ = ref(torch.tensor(x), (cos_t, sin_t), causal)
    cos, sin = rope_cos_sin(config, jnp.asarray(positions))
    got = ours(jnp.asarray(x), cos, sin, None)
    return ours, got, t2n(expected)


@pytest.mark.parametrize("name", list(CASES))
def test_mla_matches_hf_attention(name):
    config = CASES[name]
    T = 80  # longer than the tiny preset's original_max_position_embeddings (64)
    x = np.random.RandomState(2).randn(2, T, config.hidden_size).astype(np.float32)
    positions = np.stack([np.arange(T), np.arange(T)])
    _, got, expected = run_both(config, x, positions)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max() * 10)


def test_segments_attend_only_within_themselves():
    """A packed row [doc A | doc B] gives each document what it gets alone (positions restart)."""
    config = CASES["q-lora-yarn"]
    rs = np.random.RandomState(3)
    a, b = rs.randn(1, 7, config.hidden_size), rs.randn(1, 9, config.hidden_size)
    x = np.concatenate([a, b], axis=1).astype(np.float32)
    seg = np.array([[1] * 7 + [2] * 9])
    positions = np.concatenate([np.arange(7), np.arange(9)])[None]
    ours = nnx.jit(lambda m, x, positions, starts: m(x, *rope_cos_sin(config, positions), starts))
    attn = run_both(config, x, positions)[0]
    packed = ours(attn, jnp.asarray(x), jnp.asarray(positions), document_starts(jnp.asarray(seg)))
    for part, sl in ((a, slice(0, 7)), (b, slice(7, 16))):
        T = part.shape[1]
        alone = ours(attn, jnp.asarray(part, jnp.float32), jnp.arange(T)[None], None)
        np.testing.assert_allclose(packed[:, sl], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp8_emulated"])
def test_down_projections_joined_equal_each_apart(precision):
    """q_a and kv_a as one product equal each Linear alone, bit for bit, also under the FP8
    recipe, whose 128x128 weight blocks would straddle the two weights without q_a's padding
    (the tiny q_lora_rank is 32); each weight and the input get their own gradient."""
    config = CASES["q-lora-yarn"]
    attn = MLA(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (2, 5, config.hidden_size))
    cot = [jax.random.normal(jax.random.key(2 + i), (2, 5, n)) for i, n in
           enumerate((config.q_lora_rank, config.kv_lora_rank + config.qk_rope_head_dim))]

    graphdef, state = nnx.split(attn)

    def loss(state, x, joined):
        a = nnx.merge(graphdef, state)
        with fp8.use(fp8.recipe_for(precision)):
            outs = a._down(x) if joined else (a.q_a_proj(x), a.kv_a_proj(x))
        return sum(jnp.sum(o.astype(jnp.float32) * g) for o, g in zip(outs, cot)), outs

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (_, joined), g_joined = grad(state, x, True)
    (_, apart), g_apart = grad(state, x, False)
    for a, b in zip(joined, apart):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    for a, b in zip(jax.tree.leaves(g_joined), jax.tree.leaves(g_apart)):  # x's: one product, not two summed
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * float(jnp.abs(b).max()))
