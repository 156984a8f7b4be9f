"""MTP speculative decoding: greedy output equals plain greedy (drafts always, sometimes and
never accepted), and the verify rule keeps the main model's distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.inference import generate
from dsv3_jax.inference.sampling import Sampling
from dsv3_jax.inference.speculative import verify
from dsv3_jax.model import DeepSeekV3

CONFIG = ModelConfig.preset("tiny")
PROMPTS = [[5, 17, 99, 3, 250], [7, 1, 2, 300, 41, 42, 8, 9, 10]]


def oracle_model(context_scale: float) -> DeepSeekV3:
    """Main layers' residual branches scaled by `context_scale`, the MTP layer's zeroed and its
    eh_proj = [I; 0]: the MTP head then predicts the token after t_{i+1} from t_{i+1} alone,
    which is the main model's prediction exactly when context_scale = 0."""
    model = DeepSeekV3(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.float32)
    D = CONFIG.hidden_size
    for stack in (model.dense_layers, model.moe_layers):
        stack.attn.o_proj.kernel[...] *= context_scale
    model.dense_layers.mlp.down_proj.kernel[...] *= context_scale
    model.moe_layers.mlp.experts.down_proj[...] *= context_scale
    model.moe_layers.mlp.shared.down_proj.kernel[...] *= context_scale
    layer = model.mtp.layer
    layer.attn.o_proj.kernel[...] *= 0
    layer.mlp.experts.down_proj[...] *= 0
    layer.mlp.shared.down_proj.kernel[...] *= 0
    model.mtp.eh_proj.kernel[...] = jnp.concatenate([jnp.eye(D), jnp.zeros((D, D))])[None]
    return model


@pytest.mark.parametrize("context_scale,expect", [(0.0, "all"), (1.0, "some")])
def test_speculative_greedy_equals_plain_greedy(context_scale, expect):
    model = oracle_model(context_scale)
    plain = generate(model, PROMPTS, 8)
    spec = generate(model, PROMPTS, 8, speculative=True)
    assert spec.tokens == plain.tokens
    if expect == "all":
        assert spec.acceptance_rate == 1.0 and spec.steps < plain.steps
    else:  # the context now matters: some drafts are rejected, some accepted
        assert 0 < spec.accepted < spec.drafted


def test_speculative_with_random_mtp_equals_plain_greedy():
    model = DeepSeekV3(CONFIG, rngs=nnx.Rngs(1), dtype=jnp.float32)
    assert generate(model, PROMPTS, 6, speculative=True).tokens == generate(model, PROMPTS, 6).tokens


def test_verify_keeps_the_target_distribution():
    p = jnp.array([0.5, 0.3, 0.2, 0.0])
    n = 40000
    probs = jnp.broadcast_to(p, (n, 4))
    for d in (0, 2, 3):
        _, tokens = verify(probs, jnp.full((n,), d, jnp.int32), jax.random.key(d), Sampling(temperature=1.0))
        freq = np.bincount(np.asarray(tokens), minlength=4) / n
        np.testing.assert_allclose(freq, p, atol=0.01)
