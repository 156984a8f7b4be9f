import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3, RouterBias

CONFIG = ModelConfig.preset("tiny")


def _model(config=CONFIG, dtype=jnp.float32):
    return DeepSeekV3(config, rngs=nnx.Rngs(0), dtype=dtype)


def test_output_shapes_and_dtypes():
    model = _model(dtype=jnp.bfloat16)
    out = model(jnp.zeros((2, 10), jnp.int32))
    assert out.logits.shape == (2, 10, CONFIG.vocab_size) and out.logits.dtype == jnp.bfloat16
    assert out.mtp_logits.shape == (1, 2, 10, CONFIG.vocab_size)
    assert out.hidden_states.shape == (2, 10, CONFIG.hidden_size)
    assert out.expert_load.shape == (CONFIG.num_moe_layers + 1, CONFIG.n_routed_experts)
    assert out.balance_loss.shape == () and out.balance_loss.dtype == jnp.float32
    # parameters fp32 by default, router fp32 always
    assert model.lm_head.kernel.dtype == jnp.float32
    bf16_params = DeepSeekV3(CONFIG, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    assert bf16_params.moe_layers.mlp.router.kernel.dtype == jnp.float32
    assert bf16_params.moe_layers.mlp.experts.gate_proj.dtype == jnp.bfloat16


def test_padding_changes_nothing_before_it_and_is_not_counted():
    model = _model()
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, CONFIG.vocab_size, (2, 12))
    padded = np.concatenate([tokens, np.zeros((2, 4), int)], axis=1)
    seg = np.concatenate([np.ones((2, 12), int), np.zeros((2, 4), int)], axis=1)
    a = model(jnp.asarray(tokens))
    b = model(jnp.asarray(padded), segment_ids=jnp.asarray(seg))
    np.testing.assert_allclose(b.logits[:, :12], a.logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.expert_load[: CONFIG.num_moe_layers], a.expert_load[: CONFIG.num_moe_layers])
    np.testing.assert_allclose(b.balance_loss, a.balance_loss, rtol=1e-5)


def test_layers_are_scanned_so_the_program_does_not_grow_with_depth():
    def n_eqns(layers):
        config = CONFIG.replace(num_hidden_layers=layers)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: _model(config)))
        f = lambda s, t: nnx.merge(graphdef, s)(t).logits
        return len(jax.make_jaxpr(f)(state, jnp.zeros((1, 8), jnp.int32)).jaxpr.eqns)

    assert n_eqns(3) == n_eqns(9)


def test_gradients_reach_every_parameter_and_never_the_router_bias():
    model = _model()
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, CONFIG.vocab_size, (2, 16)))

    def loss(m):
        out = m(tokens)
        logp = jax.nn.log_softmax(out.logits[:, :-1])
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean() + out.mtp_logits.mean() + out.balance_loss

    grads = nnx.jit(nnx.grad(loss))(model)
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]
    assert not any("bias" in jax.tree_util.keystr(p) for p, _ in flat)
    for path, g in flat:
        assert bool(jnp.all(jnp.isfinite(g))), path
        assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
    assert len(jax.tree.leaves(nnx.state(model, RouterBias))) == 2  # moe stack + mtp stack
