import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsv3_jax import kernels
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.optimizer import decay_mask, global_norm, make_optimizer, master_parts, master_weight

OK = jnp.bool_(True)


def _params():
    rs = np.random.RandomState(0)
    return {"attn": {"q_proj": {"kernel": jnp.asarray(rs.randn(2, 4, 3), jnp.float32)}},
            "attn_norm": {"scale": jnp.asarray(1 + rs.randn(2, 4), jnp.float32)}}


def test_decay_skips_norm_scales_even_when_stacked_2d():
    assert decay_mask(_params()) == {"attn": {"q_proj": {"kernel": True}}, "attn_norm": {"scale": False}}


def _stacked_params():
    """A layer stack's weight and norm scales (dims beyond their logical axes), and a plain weight."""
    rs = np.random.RandomState(3)
    param = lambda x, axes: nnx.Param(jnp.asarray(x, jnp.float32), logical_axes=axes)
    return nnx.State({"layers": {"w": param(rs.randn(3, 40, 30), ("embed", "mlp")),
                                 "norm": {"scale": param(1 + rs.randn(3, 30), ("norm",))}},
                      "head": param(rs.randn(30, 7), ("embed", "vocab"))})


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("mean_of", [1, 2])
def test_matches_optax_adamw_with_clipping(impl, mean_of):
    """Summed gradients of `mean_of` micro-batches step the params as optax's clipped AdamW steps
    them on their mean; a layer stack's leaves go through `kernels.layer_update` (Pallas in
    interpret mode here), a layer at a time."""
    c = TrainConfig(moments_dtype="float32")  # optax keeps fp32 moments
    lr = 1e-2
    for params in (_params(), _stacked_params()):
        ours = make_optimizer(c)
        update = jax.jit(ours.update, static_argnames="mean_of")  # traced under the first call's kernels.use
        ref = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=decay_mask))
        s_ours, s_ref, p_ours, p_ref = ours.init(params), ref.init(params), params, params
        rs = np.random.RandomState(1)
        for _ in range(4):
            g = jax.tree.map(lambda p, rs=rs: jnp.asarray(rs.randn(*p.shape) * 3, jnp.float32), params)
            with kernels.use(layer_update=impl):
                p_ours, _, s_ours = update(p_ours, None, s_ours, jax.tree.map(lambda x: x * mean_of, g),
                                           norm=global_norm(g), mean_of=mean_of, lr=lr, ok=OK)
            u, s_ref = ref.update(g, s_ref, p_ref)
            p_ref = optax.apply_updates(p_ref, u)
        for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert int(s_ours[1].count) == 4


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_a_step_not_ok_keeps_every_array(impl):
    params = _stacked_params()
    ours = make_optimizer(TrainConfig())
    state = ours.init(params)
    rest = jax.tree.map(lambda p: master_parts(p, jnp.bfloat16)[1], params)
    bf16 = jax.tree.map(lambda p: master_parts(p, jnp.bfloat16)[0], params)
    g = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bfloat16), params)
    with kernels.use(layer_update=impl):
        new = ours.update(bf16, rest, state, g, norm=jnp.float32(1.0), mean_of=1, lr=1e-2, ok=jnp.bool_(False))
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves((bf16, rest, state))):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def test_bf16_moments_match_adamw_that_rounds_its_stored_moments():
    """The default (the paper's BF16 m and v) against a NumPy AdamW whose steps use the fresh
    fp32 moments and store them rounded to bf16."""
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.95, 1e-8, 0.1
    params = _params()
    ours = make_optimizer(TrainConfig())
    state, p_ours = ours.init(params), params
    p_ref = [np.asarray(p) for p in jax.tree.leaves(params)]
    decay = jax.tree.leaves(decay_mask(params))
    m, v = [np.zeros_like(p) for p in p_ref], [np.zeros_like(p) for p in p_ref]
    rs = np.random.RandomState(1)
    for t in range(1, 5):
        g = jax.tree.map(lambda p: (rs.randn(*p.shape) * 3).astype(np.float32), params)
        p_ours, _, state = ours.update(p_ours, None, state, g, norm=global_norm(g), mean_of=1, lr=lr, ok=OK)
        g = [np.asarray(x) for x in jax.tree.leaves(g)]
        scale = np.float32(min(1.0, 1.0 / np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in g))))
        for i, (gi, di) in enumerate(zip(g, decay)):
            gi = gi * scale
            m_i, v_i = b1 * m[i] + (1 - b1) * gi, b2 * v[i] + (1 - b2) * gi * gi
            step = (m_i / (1 - b1 ** t)) / (np.sqrt(v_i / (1 - b2 ** t)) + eps) + (wd * p_ref[i] if di else 0)
            p_ref[i] = p_ref[i] - lr * step
            m[i], v[i] = (a.astype(jnp.bfloat16).astype(np.float32) for a in (m_i, v_i))
    adam = state[1]
    for ours_, ref in ((adam.mu, m), (adam.nu, v)):
        for a, b in zip(jax.tree.leaves(ours_), ref):
            assert a.dtype == jnp.bfloat16
            np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2 ** -8)
    for a, b in zip(jax.tree.leaves(p_ours), p_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_moments_are_stored_in_bf16():
    state = make_optimizer(TrainConfig(moments_dtype="bfloat16")).init(_params())
    adam = state[1]
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}


def test_global_norm_sums_stacked_layers_one_at_a_time_to_the_whole_norm():
    """Variables with a stacked-layer dim (beyond their logical axes) are summed slice by slice;
    the result is the norm of every value, as NumPy computes it."""
    rs = np.random.RandomState(2)
    stacked = nnx.Param(jnp.asarray(rs.randn(3, 4, 5), jnp.bfloat16), logical_axes=("embed", "heads"))
    two_stacks = nnx.Param(jnp.asarray(rs.randn(2, 2, 4), jnp.float32), logical_axes=("norm",))
    plain = nnx.Param(jnp.asarray(rs.randn(6), jnp.float32), logical_axes=("norm",))
    tree = nnx.State({"a": stacked, "b": two_stacks, "c": plain, "d": jnp.asarray(rs.randn(2, 3), jnp.float32)})
    values = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
    np.testing.assert_allclose(float(jax.jit(global_norm)(tree)), np.linalg.norm(np.concatenate(values)), rtol=1e-6)


def test_master_parts_round_to_nearest_and_join_back_bit_for_bit():
    """A float32 master splits into a bfloat16 param and an int16 rest: joined, they are the master
    to the bit (zeros, subnormals, the largest finite value and infinities included; a NaN as a
    NaN); the param is ml_dtypes' round-to-nearest-even cast but at exact ties, which go away
    from zero, and a NaN's is a NaN."""
    import ml_dtypes  # noqa: PLC0415

    rs = np.random.RandomState(0)
    random = rs.randint(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    bits = np.concatenate([random, (random[:100] & 0xFFFF0000) | 0x8000,  # ties
                           np.array([0, 0x80000000, 1, 0x8000, 0x00018000, 0x3F808000, 0xBF818000, 0x7F7FFFFF,
                                     0x7F7F7FFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7FFFFFFF,
                                     0xFFFF8000], np.uint32)])
    m = bits.view(np.float32)
    param, rest = jax.jit(lambda x: master_parts(x, jnp.bfloat16))(m)
    assert (param.dtype, rest.dtype) == (jnp.bfloat16, jnp.int16)
    back = np.asarray(jax.jit(master_weight)(param, rest))
    nan = np.isnan(m)
    assert nan.sum() > 10 and np.isnan(back[nan]).all()
    np.testing.assert_array_equal(back[~nan].view(np.uint32), bits[~nan])
    got = np.asarray(param).astype(np.float64)
    with np.errstate(invalid="ignore"):  # NaNs cast
        even = m.astype(ml_dtypes.bfloat16).astype(np.float64)
    tie = (bits & 0xFFFF) == 0x8000
    finite = np.isfinite(m) & np.isfinite(even)
    np.testing.assert_array_equal(got[~tie & finite], even[~tie & finite])
    t = tie & finite
    assert t.sum() >= 100
    np.testing.assert_array_equal(np.abs(got[t] - m[t]), np.abs(even[t] - m[t]))  # nearest, both
    assert (np.abs(got[t]) > np.abs(m[t].astype(np.float64))).all()  # away from zero
    assert np.isnan(got[np.isnan(m)]).all()


def test_master_parts_of_a_float32_param_are_the_master():
    m = jnp.asarray(np.random.RandomState(1).randn(3, 5), jnp.float32)
    param, rest = master_parts(m, jnp.float32)
    assert param is m and rest.dtype == jnp.int16 and not rest.any()
    assert master_weight(param, rest) is m
