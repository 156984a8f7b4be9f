import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.checkpoint.manager import abstract_like
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3, RouterBias
from dsv3_jax.parallel import make_mesh
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.optimizer import make_optimizer, master_parts, master_weight
from dsv3_jax.train.step import (
    GPU_STEP_OPTIONS,
    TrainState,
    abstract_state,
    compiler_options,
    init_state,
    layers_per_scan,
    make_train_step,
    max_violation,
    update_bias,
)

CONFIG = ModelConfig.preset("tiny", num_hidden_layers=2)


def _setup(train_config):
    model = DeepSeekV3(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.float32)
    graphdef, params, bias = nnx.split(model, nnx.Param, RouterBias)
    tx = make_optimizer(train_config)
    state = TrainState(jnp.int32(0), jnp.int32(0), params, bias, tx.init(params))
    step = jax.jit(make_train_step(graphdef, CONFIG, train_config, tx, planned_micro_batches=100))
    return model, state, step


def _batch(seed, A=1, B=2, T=24):
    rs = np.random.RandomState(seed)
    return {"tokens": jnp.asarray(rs.randint(0, CONFIG.vocab_size, (A, B, T)), jnp.int32),
            "segment_ids": jnp.ones((A, B, T), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (A, B, T))}


def test_layers_per_scan_unrolls_every_layer_on_gpu_only_by_default(monkeypatch):
    config = ModelConfig.preset("bench")  # 1 dense layer, 11 MoE layers
    assert layers_per_scan(config, TrainConfig()) == 1  # this CPU
    assert layers_per_scan(config, TrainConfig(scan_unroll=3)) == 3
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert layers_per_scan(config, TrainConfig()) == 11
    assert layers_per_scan(config, TrainConfig(scan_unroll=2)) == 2


def test_max_violation_by_hand():
    np.testing.assert_allclose(max_violation(jnp.asarray([[1.0, 1, 1, 1], [4.0, 0, 0, 0]])), [0.0, 3.0])


def test_update_bias_moves_against_the_load_per_layer():
    bias = {"moe_layers": {"mlp": {"router": {"bias": jnp.zeros((2, 4))}}},
            "mtp": {"layer": {"mlp": {"router": {"bias": jnp.zeros((1, 4))}}}}}
    load = jnp.asarray([[4.0, 0, 2, 2], [1.0, 1, 1, 1], [0.0, 0, 0, 8]])
    new = update_bias(bias, load, 0.5, num_moe_layers=2)
    np.testing.assert_allclose(new["moe_layers"]["mlp"]["router"]["bias"], [[-0.5, 0.5, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(new["mtp"]["layer"]["mlp"]["router"]["bias"], [[0.5, 0.5, 0.5, -0.5]])


def test_bias_update_balances_a_skewed_router_while_its_gradient_stays_zero():
    train_config = TrainConfig(peak_lr=0.0, bias_gamma=0.02, bias_gamma_until=1.0, warmup_fraction=0.0)
    model, state, step = _setup(train_config)
    skew = jnp.asarray(np.linspace(0.3, -0.3, CONFIG.n_routed_experts), jnp.float32)
    state = state._replace(bias=jax.tree.map(lambda b: jnp.broadcast_to(skew, b.shape), state.bias))
    vio = []
    for i in range(25):
        state, metrics = step(state, _batch(i))
        vio.append(float(metrics["max_violation"]))
    assert vio[0] > 2.0 and np.mean(vio[-5:]) < 0.5 * vio[0]
    # the only thing that changed is the bias: no gradient or update reached the parameters
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(a, b)

    def loss(params, bias):
        out = nnx.merge(nnx.graphdef(model), params, bias)(_batch(0)["tokens"][0])
        return out.logits.sum() + out.balance_loss + out.mtp_logits.sum()

    _, bias_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(state.params, state.bias)  # op by op: 4x slower
    for g in jax.tree.leaves(bias_grads):
        np.testing.assert_array_equal(g, 0.0)


def test_accumulated_micro_batches_equal_one_big_batch():
    """Two micro-batches step the params as one batch of both. Adam's eps at 1 and no clipping
    make the step linear in the gradient, so its scale shows (the mean, not the sum) and a
    gradient near eps does not turn the two sums' last-bit differences into half a step."""
    tc = TrainConfig(warmup_fraction=0.0, adam_eps=1.0, clip_norm=1e9)
    _, state1, step = _setup(tc)
    _, state2, _ = _setup(tc)
    big = _batch(7, A=1, B=4)
    halves = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[2:]), big)
    start = jax.tree.map(np.asarray, state1.params)
    s1, m1 = step(state1, big)
    s2, m2 = step(state2, halves)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    for p0, a, b in zip(jax.tree.leaves(start), jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        d1, d2 = np.asarray(a) - p0, np.asarray(b) - p0
        np.testing.assert_allclose(d2, d1, rtol=1e-3, atol=1e-3 * np.abs(d1).max() + 2 * np.spacing(np.abs(p0).max()))
    np.testing.assert_array_equal(s2.micro_batches, 2)


def test_gpu_step_options_are_valid_xla_options_and_change_no_result(monkeypatch):
    """A step on one GPU compiles with GPU_STEP_OPTIONS (more devices and other backends with
    none); forced here on the CPU, where XLA accepts and ignores GPU options, the step matches."""
    one, two = make_mesh(devices=jax.devices()[:1]), make_mesh(devices=jax.devices()[:2])
    assert compiler_options(one) is None
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert compiler_options(one) == GPU_STEP_OPTIONS and compiler_options(two) is None
    monkeypatch.undo()
    model, state, step = _setup(TrainConfig())
    graphdef = nnx.graphdef(model)
    optioned = jax.jit(make_train_step(graphdef, CONFIG, TrainConfig(), make_optimizer(TrainConfig()), 100),
                       compiler_options=GPU_STEP_OPTIONS)
    for a, b in zip(jax.tree.leaves(optioned(state, _batch(0))), jax.tree.leaves(step(state, _batch(0)))):
        np.testing.assert_array_equal(a, b)


def test_non_finite_step_leaves_the_state_unchanged():
    _, state, step = _setup(TrainConfig())
    bad = state._replace(params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), state.params))
    new, metrics = step(bad, _batch(0))
    assert not bool(metrics["finite"])
    assert int(new.step) == 0
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(bad)):  # params, bias, moments, counters
        np.testing.assert_array_equal(a, b)


def test_unmasked_documents_are_one_causal_stream_and_padding_is_not_scored():
    """mask_documents=False: packed documents attend across each other (the plain causal
    kernel), trailing padding is neither attended to by real tokens nor scored; the step's LM
    loss equals a NumPy cross-entropy over the model's unsegmented logits."""
    model, state, step = _setup(TrainConfig(mask_documents=False))
    batch = _batch(3)
    seg = np.concatenate([np.ones((2, 10)), 2 * np.ones((2, 9)), np.zeros((2, 5))], axis=1).astype(np.int32)
    batch["segment_ids"] = jnp.asarray(seg)[None]
    _, metrics = step(state, batch)
    tokens = np.asarray(batch["tokens"][0])
    out = model(jnp.asarray(tokens))
    logits = np.asarray(out.logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    scored = [(b, t) for b in range(2) for t in range(23) if seg[b, t] and seg[b, t + 1]]  # across documents too
    want = -np.mean([logp[b, t, tokens[b, t + 1]] for b, t in scored])
    np.testing.assert_allclose(metrics["lm_loss"], want, rtol=1e-5)
    # the MTP depth at position t predicts token t+2; the total is lm + lambda mtp + alpha balance
    mtp_logits = np.asarray(out.mtp_logits[0], np.float64)
    mtp_logp = mtp_logits - np.log(np.exp(mtp_logits - mtp_logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - mtp_logits.max(-1, keepdims=True)
    mtp_scored = [(b, t) for b in range(2) for t in range(22) if seg[b, t] and seg[b, t + 2]]
    mtp_want = -np.mean([mtp_logp[b, t, tokens[b, t + 2]] for b, t in mtp_scored])
    np.testing.assert_allclose(metrics["mtp_loss"], mtp_want, rtol=1e-5)
    c = TrainConfig(mask_documents=False)
    np.testing.assert_allclose(metrics["loss"], want + c.mtp_lambda * mtp_want
                               + c.balance_alpha * float(metrics["balance_loss"]), rtol=1e-5)


@pytest.mark.parametrize("spec,moments,master", [("fsdp=2,expert=4", "bfloat16", True),
                                                 ("data=2,tensor=2,expert=2", "float32", False)])
def test_abstract_state_is_the_initial_states_shapes_and_shardings(spec, moments, master):
    """The restore target of a resumed run: what `init_state` builds, with nothing built."""
    tc = TrainConfig(moments_dtype=moments, master_weights=master, param_dtype="bfloat16" if master else "float32")
    mesh = make_mesh(spec)
    with jax.set_mesh(mesh):
        graphdef, _, target = abstract_state(CONFIG, tc, mesh)
        want_graphdef, _, state = init_state(CONFIG, tc, mesh)
    want = abstract_like(state)
    assert graphdef == want_graphdef and jax.tree.structure(target) == jax.tree.structure(want)
    for got, w in zip(jax.tree.leaves(target), jax.tree.leaves(want)):
        assert (got.shape, got.dtype, got.sharding) == (w.shape, w.dtype, w.sharding)


def test_master_weights_step_is_the_float32_step():
    """train.master_weights moves where the update lands, not the update: from weights that
    bfloat16 holds exactly (so both forward passes see the same values), one step moves the
    float32 masters as the plain float32 step moves its params, up to the gradients' one
    bfloat16 rounding (2^-9; Adam's eps at 1 and no clipping or decay make the step linear in
    the gradient, so that rounding stays that small), and the params are the masters' rounded
    high halves: bfloat16, but the routers' kernels float32 as in every model."""
    kw = dict(dtype="float32", warmup_fraction=0.0, adam_eps=1.0, clip_norm=1e9, weight_decay=0.0)
    plain = TrainConfig(**kw)
    master = TrainConfig(**kw, param_dtype="bfloat16", master_weights=True)
    mesh = make_mesh(None, jax.devices()[:1])
    model = DeepSeekV3(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.float32)
    graphdef, params, bias = nnx.split(model, nnx.Param, RouterBias)
    exact = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), params)
    out = {}
    with jax.set_mesh(mesh):
        for name, tc in (("plain", plain), ("master", master)):
            g, tx, state = init_state(CONFIG, tc, mesh, nnx.merge(graphdef, exact, bias))
            out[name], _ = jax.jit(make_train_step(g, CONFIG, tc, tx, planned_micro_batches=100))(state, _batch(5))
    assert out["plain"].master_rest is None
    leaves = lambda t: dict(jax.tree_util.tree_leaves_with_path(t))
    joined = jax.tree.map(master_weight, out["master"].params, out["master"].master_rest)
    start, moved, masters, rounded = (leaves(t) for t in (exact, out["plain"].params, joined, out["master"].params))
    for path, m in masters.items():
        name = jax.tree_util.keystr(path)
        want = np.asarray(moved[path]) - np.asarray(start[path])
        ulp = np.spacing(np.abs(np.asarray(start[path])).max())  # the float32 updates' own rounding
        np.testing.assert_allclose(np.asarray(m) - np.asarray(start[path]), want, rtol=2**-7,
                                   atol=2**-7 * np.abs(want).max() + 2 * ulp, err_msg=name)
        p = rounded[path]
        assert (m.dtype, p.dtype) == (jnp.float32, jnp.float32 if "router" in name else jnp.bfloat16), name
        np.testing.assert_array_equal(p, master_parts(m, p.dtype)[0])
    assert all(np.abs(np.asarray(masters[k]) - np.asarray(start[k])).max() > 0 for k in masters
               if "kernel" in jax.tree_util.keystr(k) or "proj" in jax.tree_util.keystr(k))  # every weight moved


def test_master_weights_accumulate_micro_batches_in_float32():
    """The micro-batches' bfloat16 gradients are summed in a float32 carry (read from the traced
    step: XLA's excess precision keeps a bfloat16 sum in float32 on the CPU too, so the values
    could not tell), and the masters' halves keep their dtypes."""
    tc = TrainConfig(dtype="float32", param_dtype="bfloat16", master_weights=True)
    mesh = make_mesh(None, jax.devices()[:1])
    with jax.set_mesh(mesh):
        g, tx, state = init_state(CONFIG, tc, mesh)
        step = make_train_step(g, CONFIG, tc, tx, planned_micro_batches=100)
        jaxpr = jax.make_jaxpr(step)(state, _batch(7, A=2))
        new, _ = jax.eval_shape(step, state, _batch(7, A=2))
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    carried = [v.aval for v in scan.outvars if v.aval.ndim >= 1]  # per-parameter sums, load [L,E]
    params = [p for p in jax.tree.leaves(state.params) if p.dtype == jnp.bfloat16]
    assert len(carried) >= len(params) and {a.dtype for a in carried} == {jnp.dtype(jnp.float32)}
    assert {m.dtype for m in jax.tree.leaves(new.master_rest)} == {jnp.dtype(jnp.int16)}
    assert jax.tree.map(lambda p: p.dtype, new.params) == jax.tree.map(lambda p: p.dtype, state.params)


def test_master_weights_need_bfloat16_params():
    with pytest.raises(ValueError, match="master_weights=True keeps float32 masters of bfloat16 params"):
        TrainConfig(master_weights=True)
