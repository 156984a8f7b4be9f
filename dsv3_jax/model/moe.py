"""DeepSeekMoE (SPEC C): sigmoid router with group-limited top-k, shared + dropless routed experts.

The router runs in fp32 whatever the compute dtype. Its correction bias `RouterBias` steers
which experts are picked but never weights them; it is not a parameter (no gradient, no weight
decay): training moves it from the global expert load (aux-loss-free balancing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax import fp8
from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers import SwiGLU, broadcast_new_axis, einsum, init_normal, matmul_f32
from dsv3_jax.parallel.expert import expert_parallel, routed_experts

EVERY_EXPERT_MAX_TOKENS = 128  # RoutedExperts: up to this many tokens every expert runs on every token
# (bench shape on an H200 at 128 tokens a step: 3.65 ms against 3.98 ms sorted + grouped)


class RouterBias(nnx.Variable):
    """Per-expert selection bias b (fp32), updated outside the gradient step."""


class Router(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        E = config.n_routed_experts
        self.kernel = nnx.Param(init_normal(rngs, (config.hidden_size, E), config.initializer_range, jnp.float32),
                                logical_axes=("embed", "router"))
        self.bias = RouterBias(jnp.zeros((E,), jnp.float32))
        self.config = config

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [N,D] -> weights [N,K] fp32, expert ids [N,K] int32, sigmoid scores [N,E] fp32.

        1. s = sigmoid(x W) in fp32; s_b = s + b.
        2. Group score = sum of the top-2 s_b in each of n_group groups; keep topk_group groups.
        3. Top-K experts by s_b among the kept groups (others masked with -inf).
        4. Weights are the unbiased s of those experts, normalised if norm_topk_prob, times
           routed_scaling_factor.
        """
        c = self.config
        N = x.shape[0]
        E, G, K = c.n_routed_experts, c.n_group, c.num_experts_per_tok
        few = N <= EVERY_EXPERT_MAX_TOKENS  # a decode step's rows: six passes and sorts (note above `_logits`)
        scores = jax.nn.sigmoid(_logits(x, self.kernel[...], few))
        biased = scores + self.bias[...]
        grouped = biased.reshape(N, G, E // G)  # [N,E] -> [N,G,E/G]
        if few:
            group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N,G]
            keep = (jax.lax.top_k(group_score, c.topk_group)[1][:, :, None] == jnp.arange(G)).any(1)  # [N,G]
        else:
            keep = _in_top_k(_top2_sum(grouped), c.topk_group)  # [N,G]
        masked = jnp.where(jnp.repeat(keep, E // G, axis=1), biased, -jnp.inf)  # keep [N,G] -> [N,E]
        expert_ids = jax.lax.top_k(masked, K)[1] if few else _top_k_indices(masked, K)  # [N,K]
        weights = jnp.take_along_axis(scores, expert_ids, axis=1)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        return weights * c.routed_scaling_factor, expert_ids.astype(jnp.int32), scores


# A decode step's few rows (up to EVERY_EXPERT_MAX_TOKENS) keep the router's earlier forms, six-pass
# logits and jax.lax.top_k: with the forms below the bench decode step took ~1.8% longer on an H200
# (docs/benchmarks.md). More rows take forms without sorts (GPU sorts took 139 us of a 16,384-token
# router), with top_k's choices: among equal values the lower index goes first.
def _logits(x: jax.Array, w: jax.Array, few: bool) -> jax.Array:
    """x [N,D] times fp32 w [D,E] -> fp32 logits [N,E], every product exact: `matmul_f32`, or for
    a decode step's `few` bf16 rows XLA's six-pass bf16 algorithm."""
    if few and x.dtype != jnp.float32:
        return jnp.einsum("nd,de->ne", x.astype(jnp.float32), w.astype(jnp.float32),
                          precision=jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6)
    return matmul_f32(x, w)


def _top2_sum(v: jax.Array) -> jax.Array:
    """v [...,n] -> the sum of its two largest values [...]."""
    first = jnp.argmax(v, axis=-1)[..., None]
    second = jnp.where(jnp.arange(v.shape[-1]) == first, -jnp.inf, v).max(-1)
    return v.max(-1) + second


def _in_top_k(v: jax.Array, k: int) -> jax.Array:
    """v [N,n] -> [N,n] bool: whether each entry is among the row's top k (top_k's set)."""
    i = jnp.arange(v.shape[-1])
    a, b = v[:, :, None], v[:, None, :]  # [N,n,1] the entry, [N,1,n] the others
    ahead = (b > a) | ((b == a) & (i[None, :] < i[:, None]))  # [N,n,n]
    return ahead.sum(-1) < k


def _top_k_indices(v: jax.Array, k: int) -> jax.Array:
    """v [N,n] -> the indices [N,k] of top_k(v, k): k rounds of argmax, each masking its pick."""
    ids = []
    for _ in range(k):
        ids.append(jnp.argmax(v, axis=-1))
        v = jnp.where(jnp.arange(v.shape[-1]) == ids[-1][:, None], -jnp.inf, v)
    return jnp.stack(ids, axis=-1)


class RoutedExperts(nnx.Module):
    """E SwiGLU experts stacked [E, in, out] (E split over the expert mesh axis); dropless.

    Gate and up are one parameter `gate_up_proj` [E,D,2,F] (axis 2: 0 gate, 1 up), so that its
    free reshape [E,D,2F] (gate columns, then up columns) is the one operand of the fused gate and
    up product, and a tensor split of F keeps each device's gate and up columns together.
    Initialised like every projection: N(0, initializer_range) in every entry (one draw for both).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        E, D, F = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        std = config.initializer_range
        self.gate_up_proj = nnx.Param(init_normal(rngs, (E, D, 2, F), std, param_dtype),
                                      logical_axes=("expert", "embed", None, "expert_mlp"))
        self.down_proj = nnx.Param(init_normal(rngs, (E, F, D), std, param_dtype),
                                   logical_axes=("expert", "expert_mlp", "embed"))
        self.dtype = dtype

    def __call__(self, x: jax.Array, weights: jax.Array, expert_ids: jax.Array) -> jax.Array:
        """x [N,D], weights/expert_ids [N,K] -> sum_k weights[n,k] * expert_{ids[n,k]}(x[n]) [N,D].

        The N*K (token, expert) assignment rows are laid out by expert (`parallel.expert.place`:
        batched blocks and grouped rows), run through each projection, weighted and summed back
        per token in fp32. Under a mesh, `parallel.expert` does this expert-parallel.
        A few tokens that touch most experts anyway (a decode step) take `_every_expert`.
        """
        N, K = expert_ids.shape
        E = self.gate_up_proj.shape[0]
        if N <= EVERY_EXPERT_MAX_TOKENS and N * K >= E and fp8.active() is None and not expert_parallel():
            y = self._every_expert(x, weights, expert_ids)
        else:
            y = routed_experts(x, weights, expert_ids, self.gate_up_proj[...], self.down_proj[...], dtype=self.dtype)
        return checkpoint_name(y, "experts_out")  # kept under remat "selective"

    def _every_expert(self, x: jax.Array, weights: jax.Array, expert_ids: jax.Array) -> jax.Array:
        """Every expert on every token as batched matmuls: no sort, each expert's weights read
        once. E/K times the routed FLOPs, which a step of a few tokens never notices: it is bound
        by reading the weights, and N*K >= E assignments read nearly all of them anyway. Gate and
        up are one product on gate_up_proj's free reshape [E,D,2F], a contiguous operand: the
        halves gate_up_proj[:, :, j] are strided, and with them as two products the bench decode
        step took 3.53 ms on the H200 against 2.09-2.14 before gate_up_proj (docs/benchmarks.md,
        forty-first session; one product measured level with two in the twenty-fifth).
        The combine gathers only each token's K picked outputs (K/E of the [E,N,D] outputs) and
        sums them in fp32: the routed path's roundings and order of terms.
        """
        N, D = x.shape
        E, _, _, F = self.gate_up_proj.shape
        xs = broadcast_new_axis(x.astype(self.dtype), (E, N, D), 0)
        gate_up = self.gate_up_proj[...].reshape(E, D, 2 * F)  # [E,D,2,F] -> [E,D,2F]
        gu = einsum("end,edf->enf", xs, gate_up, dtype=self.dtype)  # [E,N,2F]
        h = jax.nn.silu(gu[..., :F]) * gu[..., F:]  # [E,N,F]
        y = einsum("enf,efd->end", h, self.down_proj[...], dtype=self.dtype)  # [E,N,D]
        picked = y[expert_ids, jnp.arange(N)[:, None]]  # [N,K,D]: token n's k-th expert's output
        return (picked.astype(jnp.float32) * weights[:, :, None]).sum(1).astype(self.dtype)


class MoE(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.router = Router(config, rngs=rngs)
        self.experts = RoutedExperts(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if config.n_shared_experts:
            self.shared = SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                                 std=config.initializer_range, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config

    def __call__(self, x: jax.Array, token_mask: jax.Array) -> tuple[jax.Array, dict]:
        """x [B,T,D], token_mask [B,T] (False = padding) -> y [B,T,D], {"load": [E], "balance": []}."""
        c = self.config
        B, T, D = x.shape
        E, K = c.n_routed_experts, c.num_experts_per_tok
        with jax.named_scope("router"):
            weights, expert_ids, scores = self.router(x.reshape(B * T, D))
        with jax.named_scope("experts"):
            y = self.experts(x.reshape(B * T, D), weights, expert_ids).reshape(B, T, D)
        if c.n_shared_experts:
            with jax.named_scope("shared"):
                y = y + self.shared(x)
        return y, routing_stats(expert_ids.reshape(B, T, K), scores.reshape(B, T, E), token_mask, K, c.seq_aux)


def routing_stats(expert_ids: jax.Array, scores: jax.Array, token_mask: jax.Array, k: int,
                  seq_aux: bool = True) -> dict:
    """Expert load and the balance loss (SPEC G), over non-padding tokens.

    expert_ids [B,T,K], scores [B,T,E] (unbiased sigmoid), token_mask [B,T] ->
    load [E] = tokens routed to each expert; balance = mean over sequences of
    sum_i f_i P_i with f_i = E/(K T) * #tokens picking i, P_i = mean_t s_i,t / sum_j s_j,t.
    seq_aux=False is the batch-wise form (GShard / Switch style): the whole batch counts as
    one sequence, so only the batch's total load is pushed towards uniform.
    The loss counts the experts actually selected (with the bias), i.e. the real load.
    """
    B, T, E = scores.shape
    m = token_mask.astype(jnp.float32)
    picked = expert_ids[..., None] == jnp.arange(E)  # [B,T,K,E]: compared and summed in one fusion, no scatter
    counts = jnp.sum(picked * m[..., None, None], axis=(1, 2))  # [B,E]
    share = (scores / scores.sum(-1, keepdims=True) * m[..., None]).sum(1)  # [B,E] summed normalised scores
    picks, n_tok = counts, m.sum(-1, keepdims=True)  # [B,E], [B,1]
    if not seq_aux:  # [B,E] -> [1,E]: one sequence of all B*T tokens
        picks, share, n_tok = picks.sum(0, keepdims=True), share.sum(0, keepdims=True), n_tok.sum(0, keepdims=True)
    n_tok = jnp.maximum(n_tok, 1.0)
    f = picks * E / (k * n_tok)
    p = share / n_tok
    return {"load": counts.sum(0), "balance": (f * p).sum(-1).mean()}
