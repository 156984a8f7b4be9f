"""The FP8 recipe (SPEC F) against an independent NumPy implementation of it, and against BF16."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import fp8
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.model.layers import Linear
from dsv3_jax.train.config import TrainConfig

E4M3 = ml_dtypes.float8_e4m3fn


# --- the recipe in NumPy, loop by loop -------------------------------------------------------


def np_scale(amax: float, pow2: bool) -> np.float32:
    s = np.float32(amax) * np.float32(1 / 448) if amax > 0 else np.float32(1)  # amax / 448, as XLA computes it
    s = max(s, np.finfo(np.float32).tiny)  # a normal float: no flush to 0 (x / 0)
    if pow2:
        p = np.float32(1)
        while p < s:
            p *= 2
        while p / 2 >= s:
            p /= 2
        s = p
    return np.float32(s)


def np_quantize(x: np.ndarray, tile, pow2=False):
    """Zero-pad to whole tiles; per tile s = amax/448, q = E4M3(x / s). Returns (q as fp32, s)."""
    tr, tc = tile
    R, C = -(-x.shape[0] // tr) * tr, -(-x.shape[1] // tc) * tc
    xp = np.zeros((R, C), np.float32)
    xp[: x.shape[0], : x.shape[1]] = x
    q, s = np.zeros_like(xp), np.zeros((R // tr, C // tc), np.float32)
    for i in range(R // tr):
        for j in range(C // tc):
            blk = xp[i * tr:(i + 1) * tr, j * tc:(j + 1) * tc]
            s[i, j] = np_scale(np.abs(blk).max(), pow2)
            q[i * tr:(i + 1) * tr, j * tc:(j + 1) * tc] = np.clip(blk / s[i, j], -448, 448).astype(E4M3).astype(
                np.float32)
    return q, s


def np_dequantize(q, s, tile):
    return q * np.repeat(np.repeat(s, tile[0], 0), tile[1], 1)


def np_chunked_dot(a, sa, b, sb):
    """sum_c sa[:,c] sb[c,:] (a[:, c-th 128] @ b[c-th 128, :]) in fp32."""
    out = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for c in range(a.shape[1] // 128):
        part = a[:, c * 128:(c + 1) * 128].astype(np.float64) @ b[c * 128:(c + 1) * 128].astype(np.float64)
        out += part.astype(np.float32) * sa[:, c:c + 1] * sb[c:c + 1, :]
    return out


def np_fp8_linear(x, w, g, pow2=False):
    """Forward y = x w and the gradients (dx, dw) of <g, y>, every GEMM on the FP8 grid."""
    K, N = x.shape[1], w.shape[1]
    xq, xs = np_quantize(x, (1, 128), pow2)
    wq, ws = np_quantize(w, (128, 128), pow2)
    y = np_chunked_dot(xq, xs, wq, np.repeat(ws, 128, 1))[:, :N]
    gq, gs = np_quantize(g, (1, 128), pow2)
    dx = np_chunked_dot(gq, gs, wq.T, np.repeat(ws.T, 128, 1))[:, :K]
    xt, xts = np_quantize(np_dequantize(xq, xs, (1, 128)), (128, 1), pow2)  # cached x, re-tiled 128x1
    gt, gts = np_quantize(g, (128, 1), pow2)
    dw = np_chunked_dot(xt.T, xts.T, gt, gts)[:K, :N]
    return y, dx, dw


def np_expert_col_fake_quantize(x, sizes, pow2=False):
    """x [M,K] rounded on 128x1 tiles that restart at each expert: per expert (then the padding
    rows past the last one), per 128-row chunk of its rows, one scale per column."""
    out = np.zeros(x.shape, np.float32)
    bounds = np.cumsum([0, *sizes, x.shape[0] - sum(sizes)])
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        for r in range(lo, hi, 128):
            chunk = x[r:min(r + 128, hi)]
            out[r:r + len(chunk)] = np_dequantize(*np_quantize(chunk, (128, 1), pow2), (128, 1))[:len(chunk)]
    return out


def rel(a, b):
    """Max abs difference relative to the max magnitude of b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def randn(seed, shape, scale=1.0):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape) * scale, np.float32)


# --- quantisation -----------------------------------------------------------------------------


@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_error_bound(pow2):
    x = randn(0, (8, 256)) * np.exp2(np.arange(8) * 3 - 12)[:, None]  # tiles of very different scales
    q, s = fp8.quantize(jnp.asarray(x), fp8.ROW, pow2)
    back = np.asarray(fp8.dequantize(q, s, fp8.ROW))
    s_el = np.repeat(np.asarray(s), 128, 1)
    # E4M3: 3 mantissa bits (half an ulp = 2^-4 relative); subnormal spacing 2^-9 (absolute, times s)
    assert np.all(np.abs(back - x) <= np.maximum(2.0 ** -4 * np.abs(x), 2.0 ** -10 * s_el) * (1 + 1e-6))
    assert np.abs(np.asarray(q, np.float32)).max() <= 448


@pytest.mark.parametrize("pow2", [False, True])
def test_grid_values_round_trip_exactly(pow2):
    grid = np.asarray(jax.random.choice(jax.random.key(1), jnp.arange(256, dtype=jnp.uint8), (4, 256)))
    vals = grid.view(E4M3).astype(np.float32)
    vals = np.where(np.isnan(vals), 0, vals)
    vals[:, ::128] = 448  # every tile's amax is 448 * its power of two, so its scale is exact
    x = vals * np.exp2(np.array([-6, 0, 3, 9], np.float32))[:, None]
    back = fp8.fake_quantize(jnp.asarray(x), fp8.ROW, pow2)
    np.testing.assert_array_equal(np.asarray(back), x)


@pytest.mark.parametrize("pow2", [False, True])
def test_tiny_tiles_quantize_without_nan(pow2):
    """A tile whose amax / 448 underflows (flushed to 0 where denormals are) must not give 0 / 0:
    its scale stays a normal float, so gradients of ~1e-37 give finite dx and dw."""
    x, w, g = randn(14, (4, 128)), randn(15, (128, 256), 0.05), np.zeros((4, 256), np.float32)
    g[0, :3] = 1e-37, -3e-38, 1e-44  # tile 1 of row 0 is all zero; row 1 normal
    g[1] = randn(16, (256,))
    _, s = fp8.quantize(jnp.asarray(g), fp8.ROW, pow2)
    assert np.all(np.asarray(s) >= np.finfo(np.float32).tiny)
    recipe = fp8.Recipe(pow2_scales=pow2)
    dx, dw = jax.grad(lambda x, w: jnp.vdot(fp8.matmul(x, w, recipe, jnp.float32), g), (0, 1))(x, w)
    dx_ref = g.astype(np.float64) @ w.T.astype(np.float64)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))
    assert np.abs(np.asarray(dx[0])).max() < 1e-35 and rel(dx[1], dx_ref[1]) < 0.08


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("pow2", [False, True])
def test_non_finite_tile_is_not_saturated(bad, pow2):
    """An inf or NaN in a tile reaches the output as NaN (a diverging run shows it); it is not
    clipped to 448 with a scale of 1. The other tiles are untouched."""
    x, w = randn(17, (3, 256)).copy(), randn(18, (256, 8), 0.05)
    x[0, 5] = bad
    back = np.asarray(fp8.fake_quantize(jnp.asarray(x), fp8.ROW, pow2))
    assert np.all(np.isnan(back[0, :128])) and np.all(np.isfinite(back[0, 128:]))
    y = np.asarray(fp8.matmul(jnp.asarray(x), jnp.asarray(w), fp8.Recipe(pow2_scales=pow2), jnp.float32))
    assert not np.any(np.isfinite(y[0])) and np.all(np.isfinite(y[1:]))


@pytest.mark.parametrize("tile", [fp8.ROW, fp8.BLOCK, fp8.COL])
@pytest.mark.parametrize("pow2", [False, True])
def test_scales_and_values_match_numpy(tile, pow2):
    x = randn(2, (200, 300)) * np.linspace(0.01, 30, 300, dtype=np.float32)  # not multiples of 128
    x[:, 256:] = 0  # all-zero tiles (of every shape): scale 1
    q, s = fp8.quantize(fp8.pad_to(jnp.asarray(x), tile), tile, pow2)
    q_ref, s_ref = np_quantize(x, tile, pow2)
    np.testing.assert_array_equal(np.asarray(s), s_ref)
    np.testing.assert_array_equal(np.asarray(q, np.float32), q_ref)


# --- the FP8 linear -----------------------------------------------------------------------------

M, K, N = 200, 300, 160  # none a multiple of 128


@pytest.fixture(scope="module")
def linear_case():
    x, w, g = randn(3, (M, K)), randn(4, (K, N), 0.05), randn(5, (M, N))
    return x, w, g


@pytest.mark.parametrize("recipe", [fp8.Recipe(), fp8.Recipe(pow2_scales=True), fp8.Recipe(native=True)],
                         ids=["emulated", "pow2", "native"])
def test_linear_matches_numpy_recipe(linear_case, recipe):
    x, w, g = linear_case
    y, vjp = jax.vjp(lambda x, w: fp8.matmul(x, w, recipe, jnp.float32), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    y_ref, dx_ref, dw_ref = np_fp8_linear(x, w, g, recipe.pow2_scales)
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert rel(got, want) < 1e-6  # float32 rounding (summation order)


def test_linear_close_to_bf16(linear_case):
    """FP8 vs BF16 linear, output and both gradients: within 8% of the largest magnitude."""
    x, w, g = (jnp.asarray(a) for a in linear_case)
    y8, vjp8 = jax.vjp(lambda x, w: fp8.matmul(x, w, fp8.Recipe(), jnp.float32), x, w)
    bf = lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    yb, vjpb = jax.vjp(bf, x, w)
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert rel(yb, exact) < 0.01 and rel(y8, exact) < 0.08
    for got, want in zip((y8, *vjp8(g)), (yb, *vjpb(g)), strict=True):
        assert rel(got, want) < 0.08


def test_cached_input_is_fp8():
    """Residuals for the backward pass: x in E4M3 + one fp32 scale per 128 values, not BF16."""
    x, w = jnp.asarray(randn(6, (1024, 256))).astype(jnp.bfloat16), jnp.asarray(randn(7, (256, 256)))
    res8 = fp8.residual_bytes(lambda x, w: fp8.matmul(x, w, fp8.Recipe(), jnp.bfloat16), x, w)
    resb = fp8.residual_bytes(lambda x, w: jnp.dot(x, w.astype(jnp.bfloat16)), x, w)
    act8 = 1024 * 256 * (1 + 4 / 128)  # E4M3 values + scales
    assert res8 == act8 + 256 * 256 * (1 + 4 / 128 / 128)  # + the E4M3 weight and its block scales
    assert resb == 1024 * 256 * 2 + 256 * 256 * 2
    assert res8 / resb < 0.55


def test_mismatched_shapes_raise_instead_of_broadcasting():
    """Scales of the wrong shape would broadcast silently (e.g. one row of scales over 128 rows)."""
    q, s = fp8.quantize(jnp.ones((128, 256)), fp8.BLOCK)  # s [1, 2]
    with pytest.raises(ValueError, match=r"scales of shape \(1, 2\).*need \(128, 2\)"):
        fp8.dequantize(q, s, fp8.ROW)
    with pytest.raises(ValueError, match=r"shape \(200, 256\) is not whole 128x128 tiles"):
        fp8.quantize(jnp.ones((200, 256)), fp8.BLOCK)
    aq, bq = q[:4], q.T[:, :8]  # [4, 256], [256, 8]
    for a_s, b_s in ((jnp.ones((1, 2)), jnp.ones((2, 8))), (jnp.ones((4, 2)), jnp.ones((2, 1)))):
        with pytest.raises(ValueError, match="scaled matmul: .* need a_s"):
            fp8.scaled_dot(aq, a_s, bq, b_s, fp8.Recipe())
    with pytest.raises(ValueError, match="scaled matmul: .* need a_s"):
        fp8.scaled_dot(aq, jnp.ones((4, 2)), bq[:128], jnp.ones((1, 8)), fp8.Recipe())


def test_einsum_rejects_other_contractions():
    with pytest.raises(ValueError, match="projections"):
        fp8.einsum("bd,fd->bf", jnp.ones((2, 4)), jnp.ones((3, 4)), dtype=jnp.float32, recipe=fp8.Recipe())


# --- accumulation ----------------------------------------------------------------------------


def test_limited_accumulation_error_grows_without_promotion():
    """Paper §3.3.2: with a ~14-bit accumulator the error grows with K (the paper: up to ~2% at
    K = 4096); promoting to FP32 every 128 elements keeps it at the level of one interval."""
    errors, dot = {}, jax.jit(fp8.scaled_dot, static_argnums=4)
    for k in (256, 1024, 4096):
        a = np.abs(randn(8, (4, k))) + 0.5
        b = np.abs(randn(9, (k, 4))) + 0.5
        aq, a_s = fp8.quantize(jnp.asarray(a), fp8.ROW)
        bq, b_s = fp8.quantize(jnp.asarray(b), fp8.COL)  # per-column scales along K chunks
        exact = np.asarray(dot(aq, a_s, bq, b_s, fp8.Recipe()), np.float64)
        for name, interval in (("none", k), ("128", 128)):
            r = fp8.Recipe(accumulation_bits=13, promotion_interval=interval)
            errors[name, k] = rel(dot(aq, a_s, bq, b_s, r), exact)
    assert errors["none", 256] < errors["none", 1024] < errors["none", 4096]
    assert 0.002 < errors["none", 4096] < 0.05  # 13 bits, one add per 32-wide MMA: ~0.3%
    assert max(errors["128", k] for k in (256, 1024, 4096)) < 2 * errors["none", 256]
    assert errors["128", 4096] < errors["none", 4096] / 8


def np_limited_accumulation(a, sa, b, sb, bits, interval, mma_k):
    """Each mma_k-wide scaled partial product added to an accumulator whose mantissa is cut to
    `bits` bits (toward zero); the accumulator added to the fp32 result every `interval` K."""
    def cut(v):
        return (v.astype(np.float32).view(np.uint32) & np.uint32(2**32 - 2 ** (23 - bits))).view(np.float32)

    out = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for start in range(0, a.shape[1], interval):
        acc = np.zeros_like(out)
        for k in range(start, min(start + interval, a.shape[1]), mma_k):
            part = (a[:, k:k + mma_k].astype(np.float64) @ b[k:k + mma_k].astype(np.float64)).astype(np.float32)
            acc = cut(acc + part * sa[:, k // 128, None] * sb[None, k // 128])
        out += acc
    return out


@pytest.mark.parametrize("K,interval,mma_k", [(384, 128, 32), (384, 256, 32), (640, 96, 32), (256, 512, 64)])
def test_limited_accumulation_matches_numpy(K, interval, mma_k):
    """Intervals that do not divide K (or exceed it) end with a shorter last promotion."""
    a, b = np.abs(randn(19, (3, K))) + 0.5, np.abs(randn(20, (K, 5))) + 0.5
    aq, a_s = fp8.quantize(jnp.asarray(a), fp8.ROW)
    bq, b_s = fp8.quantize(jnp.asarray(b), fp8.COL)
    got = fp8.scaled_dot(aq, a_s, bq, b_s, fp8.Recipe(accumulation_bits=10, promotion_interval=interval, mma_k=mma_k))
    want = np_limited_accumulation(np.asarray(aq, np.float32), np.asarray(a_s), np.asarray(bq, np.float32),
                                   np.asarray(b_s), 10, interval, mma_k)
    assert rel(got, want) < 1e-6


@pytest.mark.parametrize("kw", [{"accumulation_bits": 24}, {"accumulation_bits": 0}, {"promotion_interval": 0},
                                {"mma_k": 0}, {"promotion_interval": 100}])
def test_recipe_rejects_impossible_settings(kw):
    with pytest.raises(ValueError, match=f"Recipe: {next(iter(kw))}="):
        fp8.Recipe(**kw)


# --- grouped (experts) -------------------------------------------------------------------------


@pytest.mark.parametrize("sizes,M", [([70, 0, 150, 36, 200], 486), ([129, 129, 129], 388), ([0, 0], 200),
                                     ([128, 256], 384)], ids=["ragged+padding", "most-tiles", "all-padding", "aligned"])
@pytest.mark.parametrize("pow2", [False, True])
def test_expert_col_tiles_match_numpy(sizes, M, pow2):
    """128x1 tiles per expert: ragged sizes, an empty expert, padding rows past the groups, and
    the most tiles the static count allows (every group one row past a whole tile)."""
    x = randn(21, (M, 300)) * np.exp2(np.arange(M) % 17 - 8.0)[:, None]  # rows of very different scales
    x[:, 256:] = 0  # all-zero tiles: scale 1
    got = jax.jit(fp8.grouped_fake_quantize, static_argnums=2)(jnp.asarray(x), jnp.asarray(sizes), pow2)
    np.testing.assert_array_equal(np.asarray(got), np_expert_col_fake_quantize(x, sizes, pow2))


@pytest.mark.parametrize("pow2", [False, True])
def test_grouped_matches_numpy_recipe(pow2):
    """Forward and dx per token row; dw from 128x1 tiles of each expert's own rows. Row 69 (the
    last of expert 0) and the padding rows past the groups are large, so tiles of 128 rows from
    row 0 (straddling experts 0 and 2, and expert 3 and the padding) would change dw of 2 and 3."""
    sizes = [70, 0, 150, 50]
    Mg, Kg, Ng = sum(sizes) + 20, 200, 136
    x, w, g = randn(10, (Mg, Kg)).copy(), randn(11, (4, Kg, Ng), 0.05), randn(12, (Mg, Ng)).copy()
    x[69] *= 1e4
    g[69] *= 1e4
    x[sum(sizes):] *= 1e6
    g[sum(sizes):] *= 1e6
    f = jax.jit(lambda x, w, gs: fp8.grouped_matmul(x, w, gs, fp8.Recipe(pow2_scales=pow2)))
    gs = jnp.asarray(sizes)  # traced: an argument of the jitted function
    y, vjp = jax.vjp(lambda x, w: f(x, w, gs), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    deq = lambda a, tile: np_dequantize(*np_quantize(a, tile, pow2), tile)[: a.shape[0], : a.shape[1]]
    x_row, g_row = deq(x, (1, 128)), deq(g, (1, 128))
    starts = np.cumsum([0] + sizes)
    for e in range(4):
        r = slice(starts[e], starts[e + 1])
        w_e = deq(w[e], (128, 128))
        if sizes[e]:
            assert rel(y[r], x_row[r] @ w_e) < 1e-6
            assert rel(dx[r], g_row[r] @ w_e.T) < 1e-6
            assert rel(dw[e], deq(x_row[r], (128, 1)).T @ deq(g[r], (128, 1))) < 1e-6  # the expert's own tiles
        else:
            assert not np.any(np.asarray(dw[e]))


# --- switch and model --------------------------------------------------------------------------


def test_switch():
    assert fp8.recipe_for("bf16") is None
    assert fp8.recipe_for("fp8_native") == fp8.Recipe(native=True)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    head = Linear(256, 8, std=0.02, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32, quantized=False)
    proj = Linear(256, 8, std=0.02, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    x = jnp.asarray(randn(13, (4, 256)))
    plain = proj(x)
    with fp8.use(fp8.Recipe()):
        np.testing.assert_array_equal(head(x), plain)  # the output head stays out of the recipe
        assert 0 < rel(proj(x), plain) < 0.08
    assert fp8.active() is None


def test_tiny_model_loss_close_to_bf16():
    """A tiny model's forward/backward in fp8_emulated: loss within 1% of BF16, gradients aligned."""
    config = ModelConfig.preset("tiny")
    graphdef, state = nnx.split(DeepSeekV3(config, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, config.vocab_size)

    @jax.jit
    def both(state):
        def loss(state, recipe):
            with fp8.use(recipe):
                out = nnx.merge(graphdef, state)(tokens)
            logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32))
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

        return [jax.value_and_grad(loss)(state, r) for r in (None, fp8.Recipe())]

    (lb, gb), (l8, g8) = both(state)
    assert np.isfinite(l8) and abs(float(l8) / float(lb) - 1) < 0.01
    flat_b, flat_8 = (jnp.concatenate([a.ravel().astype(jnp.float32) for a in jax.tree.leaves(g)]) for g in (gb, g8))
    assert np.all(np.isfinite(flat_8))
    cos = float(flat_b @ flat_8 / jnp.linalg.norm(flat_b) / jnp.linalg.norm(flat_8))
    assert cos > 0.95
