import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

from dsv3_jax import kernels
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import moe
from dsv3_jax.model.moe import MoE, Router, routing_stats
from tests.hf_reference import hf_config, randomize_, t2n

CASES = {
    "groups4-top2": ModelConfig.preset("tiny"),
    "one-group": ModelConfig.preset("tiny", n_group=1, topk_group=1, num_experts_per_tok=3),
    "unnormalised": ModelConfig.preset("tiny", norm_topk_prob=False, n_group=2, topk_group=1),
    "8groups-top3": ModelConfig.preset("tiny", n_routed_experts=16, n_group=8, topk_group=3,
                                       num_experts_per_tok=4, n_shared_experts=2),
}


def load_from_hf(ours: MoE, ref: hf.DeepseekV3MoE) -> None:
    E, D, F = ref.experts.down_proj.shape  # HF's down_proj [E, D, F]
    ours.router.kernel[...] = jnp.asarray(t2n(ref.gate.weight).T)
    ours.router.bias[...] = jnp.asarray(t2n(ref.gate.e_score_correction_bias))
    gate_up = t2n(ref.experts.gate_up_proj)  # [E, 2F, D]: gate rows then up rows
    ours.experts.gate_up_proj[...] = jnp.asarray(gate_up.reshape(E, 2, F, D).transpose(0, 3, 1, 2))  # [E,D,2,F]
    ours.experts.down_proj[...] = jnp.asarray(t2n(ref.experts.down_proj).transpose(0, 2, 1))
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(ours.shared, name).kernel[...] = jnp.asarray(t2n(getattr(ref.shared_experts, name).weight).T)


def build(config, seed=0):
    torch.manual_seed(seed)
    ref = hf.DeepseekV3MoE(hf_config(config)).eval()
    for p in (ref.gate.weight, ref.experts.gate_up_proj, ref.experts.down_proj):
        torch.nn.init.normal_(p, std=0.3)
    randomize_(ref, seed)
    ours = MoE(config, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    load_from_hf(ours, ref)
    return ours, ref


@pytest.mark.parametrize("tokens", [64, 300])  # both selection forms (sorts up to EVERY_EXPERT_MAX_TOKENS)
@pytest.mark.parametrize("name", list(CASES))
def test_router_selection_and_weights_match_hf(name, tokens):
    config = CASES[name]
    ours, ref = build(config)
    x = np.random.RandomState(1).randn(tokens, config.hidden_size).astype(np.float32)
    _, ref_w, ref_idx = ref.gate(torch.tensor(x))
    w, idx, scores = ours.router(jnp.asarray(x))
    ref_idx, ref_w = t2n(ref_idx).astype(int), t2n(ref_w)
    for t in range(len(x)):  # HF's top-k is unsorted: compare as expert -> weight maps
        assert dict(zip(ref_idx[t], ref_w[t])) == pytest.approx(dict(zip(np.asarray(idx[t]), np.asarray(w[t]))))
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-(x @ np.asarray(ours.router.kernel[...])))), rtol=1e-5)


def test_selection_without_sorts_chooses_and_orders_as_lax_top_k_with_ties():
    """The router's sort-free top-2 sum, group mask and top-K against jax.lax.top_k, on values
    with many ties (the lower index first) and masked -inf entries."""
    rs = np.random.RandomState(5)
    N, G, E, K, kept = 300, 8, 64, 6, 4
    assert N > moe.EVERY_EXPERT_MAX_TOKENS  # the Router takes these forms for this many rows
    v = jnp.asarray(rs.randint(0, 6, (N, E)) / 4, jnp.float32)  # 6 distinct values: ties everywhere
    grouped = v.reshape(N, G, E // G)
    group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
    np.testing.assert_array_equal(moe._top2_sum(grouped), group_score)
    _, top_groups = jax.lax.top_k(group_score, kept)
    keep = (top_groups[:, :, None] == jnp.arange(G)).any(1)
    np.testing.assert_array_equal(moe._in_top_k(group_score, kept), keep)
    masked = jnp.where(jnp.repeat(keep, E // G, axis=1), v, -jnp.inf)
    np.testing.assert_array_equal(moe._top_k_indices(masked, K), jax.lax.top_k(masked, K)[1])


@pytest.mark.parametrize("N", [32, 300])  # a decode step's rows (six-pass logits), more (`matmul_f32`)
def test_router_logits_of_bf16_rows_are_fp32_exact_products(N):
    """Both forms of the router's logits against float64: every bf16 x fp32 product is exact, so
    only fp32 summation error is left."""
    rs = np.random.RandomState(6)
    x = jnp.asarray(rs.randn(N, 256), jnp.bfloat16)
    w = rs.randn(256, 64).astype(np.float32)
    want = np.asarray(x, np.float64) @ w.astype(np.float64)
    got = moe._logits(x, jnp.asarray(w), few=N <= moe.EVERY_EXPERT_MAX_TOKENS)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_group_mask_is_minus_inf_so_negative_biases_never_leak_into_masked_groups():
    """With every biased score negative, a 0.0 fill (older HF) would pick masked-group experts."""
    config = ModelConfig.preset("tiny")  # 8 experts, 4 groups of 2, keep 2 groups, top-2
    router = Router(config, rngs=nnx.Rngs(0))
    router.kernel[...] = jnp.zeros_like(router.kernel[...])  # all scores sigmoid(0) = 0.5
    bias = np.array([-5, -5, -1, -1, -9, -9, -2, -2], np.float32)
    router.bias[...] = jnp.asarray(bias)
    w, idx, _ = router(jnp.ones((1, config.hidden_size)))
    # group sums of top-2: [-9, -1, -17, -3] -> keep groups 1 and 3 -> experts {2, 3, 6, 7}; top-2 = {2, 3}
    assert set(np.asarray(idx[0]).tolist()) == {2, 3}
    np.testing.assert_allclose(w[0], [1.25, 1.25])  # unbiased 0.5 each, normalised, times 2.5


def dense_reference(ours: MoE, x: np.ndarray) -> np.ndarray:
    """Every expert on every token, weighted by the router's (sparse) weights: the dispatch-free sum."""
    w, idx, _ = ours.router(jnp.asarray(x))
    E = ours.experts.gate_up_proj.shape[0]
    dense_w = np.zeros((len(x), E), np.float32)
    np.put_along_axis(dense_w, np.asarray(idx), np.asarray(w), axis=1)
    gate_up, d = (np.asarray(p[...], np.float64) for p in (ours.experts.gate_up_proj, ours.experts.down_proj))
    g, u = gate_up[:, :, 0], gate_up[:, :, 1]  # [E,D,F] each
    h = np.einsum("nd,edf->nef", x, g)
    h = h / (1 + np.exp(-h)) * np.einsum("nd,edf->nef", x, u)
    return np.einsum("nef,efd,ne->nd", h, d, dense_w)


@pytest.mark.parametrize("T,layout", [(24, "grouped"), (96, "grouped"), (96, "blocks")])
@pytest.mark.parametrize("name", list(CASES))
def test_moe_block_matches_hf_and_dense_all_experts_reference(name, T, layout):
    """48 tokens: every expert on every token; 192: routed rows, grouped or in batched blocks."""
    config = CASES[name]
    ours, ref = build(config, seed=3)
    x = np.random.RandomState(4).randn(2, T, config.hidden_size).astype(np.float32)
    with kernels.use(expert_layout=layout):  # a jit of its own: the layout is read when tracing
        y, stats, shared = nnx.jit(lambda m, x: (*m(x, jnp.ones((2, T), bool)), m.shared(x)))(ours, jnp.asarray(x))
    expected = t2n(ref(torch.tensor(x)))
    atol = 1e-6 * np.abs(expected).max()  # fp32 rounding at the outputs' scale
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=atol)
    routed = dense_reference(ours, x.reshape(2 * T, -1))
    np.testing.assert_allclose(y.reshape(2 * T, -1) - shared.reshape(2 * T, -1), routed, rtol=1e-5, atol=atol)
    assert stats["load"].sum() == 2 * T * config.num_experts_per_tok


def test_a_decode_step_never_reads_the_outputs_of_experts_its_tokens_did_not_pick():
    """A few tokens run every expert (`RoutedExperts._every_expert`); their combine takes only each
    token's picked outputs, so an unpicked expert's non-finite weights leave the result as it was."""
    ours, _ = build(CASES["groups4-top2"], seed=3)
    x = jnp.asarray(np.random.RandomState(4).randn(4, 64), jnp.float32)  # 4 tokens x top 2 >= 8 experts
    weights, ids, _ = ours.router(x)
    unpicked = sorted(set(range(8)) - set(np.asarray(ids).ravel().tolist()))
    assert unpicked  # this seed leaves some expert unpicked
    want = ours.experts(x, weights, ids)
    ours.experts.down_proj[...] = ours.experts.down_proj[...].at[unpicked[0]].set(jnp.inf)
    np.testing.assert_array_equal(ours.experts(x, weights, ids), want)


def test_moe_bf16_within_tolerance_of_fp32():
    config = CASES["groups4-top2"]
    ours, _ = build(config, seed=5)
    x = jnp.asarray(np.random.RandomState(6).randn(2, 16, config.hidden_size).astype(np.float32))
    y32, _ = ours(x, jnp.ones((2, 16), bool))
    bf16 = MoE(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    nnx.update(bf16, nnx.state(ours))
    y16, _ = bf16(x, jnp.ones((2, 16), bool))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.05, atol=0.05 * float(jnp.abs(y32).max()))


def test_routing_stats_load_and_sequence_balance_loss():
    rs = np.random.RandomState(7)
    B, T, E, K = 3, 10, 8, 2
    ids = np.stack([np.stack([rs.choice(E, K, replace=False) for _ in range(T)]) for _ in range(B)])
    scores = rs.rand(B, T, E).astype(np.float32)
    mask = np.ones((B, T), bool)
    mask[2, 6:] = False  # padding at the end of the last sequence
    stats = routing_stats(jnp.asarray(ids), jnp.asarray(scores), jnp.asarray(mask), K)
    load = np.zeros(E)
    losses = []
    for b in range(B):
        n = mask[b].sum()
        f, P = np.zeros(E), np.zeros(E)
        for t in range(T):
            if mask[b, t]:
                f[ids[b, t]] += E / (K * n)
                P += scores[b, t] / scores[b, t].sum() / n
                load[ids[b, t]] += 1
        losses.append((f * P).sum())
    np.testing.assert_allclose(stats["load"], load)
    np.testing.assert_allclose(stats["balance"], np.mean(losses), rtol=1e-6)
    # A perfectly uniform router scores exactly 1 (f_i = 1, P_i = 1/E for all i).
    uni_ids = np.stack([np.arange(T * K).reshape(T, K) % E] * 1)
    uni = routing_stats(jnp.asarray(uni_ids[:, :8]), jnp.ones((1, 8, E)), jnp.ones((1, 8), bool), K)
    assert float(uni["balance"]) == pytest.approx(1.0)


def test_routing_stats_batch_wise_balance_loss():
    """seq_aux=False: f and P over every real token of the batch at once (one sum, not a mean of
    per-sequence sums); the load is the same as the sequence-wise form's."""
    rs = np.random.RandomState(9)
    B, T, E, K = 3, 10, 8, 2
    ids = np.stack([np.stack([rs.choice(E, K, replace=False) for _ in range(T)]) for _ in range(B)])
    scores = rs.rand(B, T, E).astype(np.float32)
    mask = np.ones((B, T), bool)
    mask[1, 7:] = False
    real = mask.reshape(-1)
    flat_ids, flat_scores = ids.reshape(B * T, K)[real], scores.reshape(B * T, E)[real]
    n = real.sum()
    f = np.bincount(flat_ids.reshape(-1), minlength=E) * E / (K * n)
    P = (flat_scores / flat_scores.sum(-1, keepdims=True)).mean(0)
    batch = routing_stats(jnp.asarray(ids), jnp.asarray(scores), jnp.asarray(mask), K, seq_aux=False)
    seq = routing_stats(jnp.asarray(ids), jnp.asarray(scores), jnp.asarray(mask), K)
    np.testing.assert_allclose(batch["balance"], (f * P).sum(), rtol=1e-6)
    np.testing.assert_allclose(batch["load"], seq["load"])
    assert abs(float(batch["balance"]) - float(seq["balance"])) > 1e-3  # a different loss


def test_moe_gradients_flow_to_router_and_experts_not_bias():
    config = CASES["groups4-top2"]
    ours, _ = build(config, seed=8)
    x = jnp.asarray(np.random.RandomState(9).randn(2, 8, config.hidden_size).astype(np.float32))

    def loss(model):
        y, stats = model(x, jnp.ones((2, 8), bool))
        return (y ** 2).mean() + stats["balance"]

    grads = nnx.jit(nnx.grad(loss))(ours)
    g = nnx.to_pure_dict(grads)
    assert "bias" not in g["router"]
    for leaf in (g["router"]["kernel"], g["experts"]["gate_up_proj"], g["experts"]["down_proj"]):
        assert float(jnp.abs(leaf).max()) > 0 and bool(jnp.all(jnp.isfinite(leaf)))
    jax.block_until_ready(g)
