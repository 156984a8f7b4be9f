import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3, RouterBias
from dsv3_jax.model.transformer import REMATS, remat, scan_unroll

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
    assert bf16_params.moe_layers.mlp.experts.gate_up_proj.dtype == jnp.bfloat16


@pytest.mark.parametrize("mask", ["segment_ids", "token_mask"])
def test_padding_changes_nothing_before_it_and_is_not_counted(mask):
    """Trailing padding marked as segment 0 or by a token mask (the causal-only form) leaves
    the tokens before it as without padding, and is not counted in the expert statistics."""
    model = _model()
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, CONFIG.vocab_size, (2, 12))
    padded = np.concatenate([tokens, np.zeros((2, 4), int)], axis=1)
    seg = np.concatenate([np.ones((2, 12), int), np.zeros((2, 4), int)], axis=1)
    a = model(jnp.asarray(tokens))
    b = model(jnp.asarray(padded), **{mask: jnp.asarray(seg) if mask == "segment_ids" else jnp.asarray(seg != 0)})
    np.testing.assert_allclose(b.logits[:, :12], a.logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.expert_load[: CONFIG.num_moe_layers], a.expert_load[: CONFIG.num_moe_layers])
    np.testing.assert_allclose(b.balance_loss, a.balance_loss, rtol=1e-5)


def test_segment_ids_and_token_mask_together_are_refused():
    model = _model()
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="not both"):
        model(tokens, segment_ids=jnp.ones((1, 4), jnp.int32), token_mask=jnp.ones((1, 4), bool))


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


def test_remat_policies_give_the_same_gradients_and_save_less():
    config = CONFIG.replace(num_hidden_layers=2, num_nextn_predict_layers=1)  # one dense, one MoE layer, MTP
    graphdef, params, rest = nnx.split(_model(config), nnx.Param, ...)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, config.vocab_size, (2, 16)))

    def loss(p, r):  # differentiated in the router bias too (its gradient is 0): nnx wants one trace level
        out = nnx.merge(graphdef, p, r)(tokens)
        return (jax.nn.logsumexp(out.logits, -1).mean() + jax.nn.logsumexp(out.mtp_logits, -1).mean()
                + out.balance_loss)

    def traced(policy):
        with remat(policy):
            residuals = saved_residuals(loss, params, rest)  # what autodiff keeps for the backward
            grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, rest)[0]
        return sum(math.prod(aval.shape) * aval.dtype.itemsize for aval, _ in residuals), grads

    saved, grads = zip(*(traced(p) for p in REMATS), strict=True)
    none, selective, full = saved
    assert none > selective > full, saved
    for g in grads[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g, grads[0])
    with pytest.raises(ValueError, match="remat 'some': choose from"):
        with remat("some"):
            pass


def test_full_remat_covers_the_mtp_block():
    """Under "full" the MTP block keeps little more than its inputs: what it adds to the saved
    activations (one sequence more minus one less: the weights cancel) is a fraction of what it
    adds under "none"."""
    def saved(n_mtp, policy, batch):
        tokens = jnp.asarray(np.random.RandomState(3).randint(0, CONFIG.vocab_size, (batch, 16)))
        graphdef, params, rest = nnx.split(_model(CONFIG.replace(num_nextn_predict_layers=n_mtp)), nnx.Param, ...)

        def loss(p, r):
            out = nnx.merge(graphdef, p, r)(tokens)
            mtp = out.mtp_hidden_states.astype(jnp.float32).sum() if n_mtp else 0.0
            return out.hidden_states.astype(jnp.float32).sum() + mtp

        with remat(policy):
            return sum(math.prod(a.shape) * a.dtype.itemsize for a, _ in saved_residuals(loss, params, rest))

    per_seq = lambda n, policy: saved(n, policy, 2) - saved(n, policy, 1)
    added = {policy: per_seq(1, policy) - per_seq(0, policy) for policy in ("none", "full")}
    assert 0 < added["full"] < added["none"] / 4, added


def test_unrolled_layer_scans_compute_the_same_loss_and_gradients():
    config = CONFIG.replace(num_hidden_layers=3)  # one dense layer, a stack of two MoE layers, MTP
    graphdef, params, rest = nnx.split(_model(config), nnx.Param, ...)
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, config.vocab_size, (2, 16)))

    def loss(p, r):
        out = nnx.merge(graphdef, p, r)(tokens)
        return jax.nn.logsumexp(out.logits, -1).mean() + out.balance_loss

    def run(n):
        with scan_unroll(n):
            jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(params, rest)
            value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, rest)
        unrolls = {e.params["unroll"] for e in jaxpr.eqns if e.primitive.name == "scan" and "unroll" in e.params}
        return value, grads[0], unrolls

    (v1, g1, u1), (v2, g2, u2) = run(1), run(2)
    assert u1 == {1} and 2 in u2
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g2, g1)
    with pytest.raises(ValueError, match="scan_unroll 0"):
        with scan_unroll(0):
            pass
