"""The DeepSeek-V3 decoder: embedding, a scanned dense stack, a scanned MoE stack, head, MTP."""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels.attention import document_starts
from dsv3_jax.model.layers import Embed, Linear, RMSNorm, SwiGLU
from dsv3_jax.model.mla import MLA, CacheView, LatentCache
from dsv3_jax.model.moe import MoE
from dsv3_jax.model.mtp import MTPBlock
from dsv3_jax.model.rope import rope_cos_sin
from dsv3_jax.parallel.mesh import constrain


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B,T,V]
    mtp_logits: jax.Array | None  # [N,B,T,V]: depth k+1 at position i predicts token i+k+2
    expert_load: jax.Array  # [Lm+N,E] tokens per routed expert: main MoE layers, then MTP layers
    balance_loss: jax.Array  # [] sum over those layers of the balance loss (no alpha; config.seq_aux)
    hidden_states: jax.Array  # [B,T,D] after the final norm
    mtp_hidden_states: jax.Array | None  # [N,B,T,D] each depth's normed output (the head's input)
    cache: Cache | None = None  # the updated cache, when called with one


class Cache(NamedTuple):
    """The decode cache of the main stacks (`inference.init_cache`); None for an absent stack."""

    dense: LatentCache | None
    moe: LatentCache | None


class DecoderLayer(nnx.Module):
    """Pre-norm block: x += MLA(attn_norm(x)); x += FFN(mlp_norm(x)), FFN dense or MoE."""

    def __init__(self, config: ModelConfig, *, moe: bool, rngs: nnx.Rngs, dtype, param_dtype):
        norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = RMSNorm(config.hidden_size, **norm)
        self.attn = MLA(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp_norm = RMSNorm(config.hidden_size, **norm)
        if moe:
            self.mlp = MoE(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, std=config.initializer_range,
                              rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.moe = moe

    def __call__(self, x, cos, sin, starts, token_mask, cache: CacheView | None = None):
        """-> (x, stats), or (x, stats, updated LatentCache) when given a cache (`MLA.decode`)."""
        with jax.named_scope("attention"):
            if cache is None:
                a = self.attn(self.attn_norm(x), cos, sin, starts)
            else:
                a, updated = self.attn.decode(self.attn_norm(x), cos, sin, cache)
            x = constrain(x + a, "batch", None, None)
        with jax.named_scope("moe" if self.moe else "mlp"):
            if self.moe:
                y, stats = self.mlp(self.mlp_norm(x), token_mask)
            else:
                y, stats = self.mlp(self.mlp_norm(x)), {}
        x = constrain(x + y, "batch", None, None)
        return (x, stats) if cache is None else (x, stats, updated)


def _stack(n: int, make, rngs: nnx.Rngs):
    """n copies of make(rngs) with parameters stacked on a leading axis (for nnx.scan)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(r):
        return make(r)

    return build(rngs)


REMATS = ("none", "selective", "full")
SAVED = ("attention_out", "experts_out")  # what "selective" keeps (checkpoint_name in mla / moe)
_remat: contextvars.ContextVar[str] = contextvars.ContextVar("dsv3_remat", default="none")
_unroll: contextvars.ContextVar[int] = contextvars.ContextVar("dsv3_scan_unroll", default=1)


@contextlib.contextmanager
def remat(policy: str):
    """Rematerialise each layer of the scanned stacks in the backward pass, for models traced
    inside: "none" saves every residual; "full" saves only each layer's input (the scan carry)
    and recomputes the layer; "selective" also keeps the attention core's and the routed
    experts' outputs (the costly parts: flash attention, dispatch and grouped matmuls).
    """
    if policy not in REMATS:
        raise ValueError(f"remat {policy!r}: choose from {REMATS}")
    with _scoped(_remat, policy):
        yield


@contextlib.contextmanager
def scan_unroll(n: int):
    """Unroll the layer scans n layers per loop iteration (n >= the stack's depth: straight-line
    code, larger programs and slower compiles, more room for XLA to overlap layers), for models
    traced inside."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"scan_unroll {n!r}: a positive number of layers per iteration")
    with _scoped(_unroll, n):
        yield


def full_depth(config: ModelConfig) -> int:
    """Layers in the deepest stack: `scan_unroll(full_depth(c))` runs every stack unrolled."""
    return max(config.num_dense_layers, config.num_moe_layers, 1)


@contextlib.contextmanager
def _scoped(var: contextvars.ContextVar, value):
    """`var` set to `value` inside the block, restored after."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def _layer_fn():
    """layer(x, *shared), wrapped in the active remat policy."""
    policy = _remat.get()

    if policy == "none":
        return lambda layer, x, *shared: layer(x, *shared)
    saved = jax.checkpoint_policies.save_only_these_names(*SAVED) if policy == "selective" else None

    def call(layer, x, *shared):  # pure in the layer's state (the forward pass mutates none)
        graphdef, state = nnx.split(layer)
        return jax.checkpoint(lambda s, *a: nnx.merge(graphdef, s)(*a), policy=saved)(state, x, *shared)

    return call


def _scan(stack, x, *shared):
    """Run a stacked layer module over its leading axis; returns (x, per-layer stats)."""
    call = _layer_fn()

    @nnx.scan(in_axes=(0, nnx.Carry) + (None,) * len(shared), out_axes=(nnx.Carry, 0), unroll=_unroll.get())
    def step(layer, x, *shared):
        return call(layer, x, *shared)

    return step(stack, x, *shared)


def scan_cached(stack, x, cache: LatentCache, slots, *shared):
    """`_scan` with the stack's cache in the carry (written in place, one layer's slots at a
    time); returns (x, per-layer stats, updated cache)."""

    @nnx.scan(in_axes=(0, nnx.Carry, 0) + (None,) * (1 + len(shared)), out_axes=(nnx.Carry, 0),
              unroll=_unroll.get())
    def step(layer, carry, i, slots, *shared):
        x, cache = carry
        x, stats, cache = layer(x, *shared, cache=CacheView(cache, i, slots))
        return (x, cache), stats

    (x, cache), stats = step(stack, (x, cache), jnp.arange(cache.latent.shape[0]), slots, *shared)
    return x, stats, cache


class DeepSeekV3(nnx.Module):
    """DeepSeek-V3 with its MTP modules.

    Parameters are created in `param_dtype` (fp32 by default) and computed in `dtype` (bf16 by
    default); the router is fp32 always. Layer stacks are scanned, so compile time does not
    grow with depth.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16, param_dtype=jnp.float32):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.embed = Embed(c.vocab_size, c.hidden_size, std=c.initializer_range, rngs=rngs, **kw)
        self.dense_layers = (_stack(c.num_dense_layers, lambda r: DecoderLayer(c, moe=False, rngs=r, **kw), rngs)
                             if c.num_dense_layers else None)
        self.moe_layers = (_stack(c.num_moe_layers, lambda r: DecoderLayer(c, moe=True, rngs=r, **kw), rngs)
                           if c.num_moe_layers else None)
        self.final_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, **kw)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, std=c.initializer_range, rngs=rngs,
                              axes=("embed", "vocab"), quantized=False, **kw)  # BF16 under FP8 too (SPEC F)
        self.mtp = (_stack(c.num_nextn_predict_layers, lambda r: MTPBlock(c, rngs=r, **kw), rngs)
                    if c.num_nextn_predict_layers else None)

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, token_mask: jax.Array | None = None,
                 cache: Cache | None = None) -> ModelOutput:
        """tokens [B,T] int -> ModelOutput.

        positions [B,T] default 0..T-1 (rotary angles). segment_ids [B,T]: tokens attend only
        within their own segment, a contiguous run of equal ids (packed documents); segment 0
        marks padding, left out of the expert load and balance loss. Or token_mask [B,T] bool:
        False marks padding, which must come after a row's tokens (each row one causal stream,
        no document masks: the attention kernel's plain causal form). Attention is causal by
        index. Traced inside `jax.set_mesh(mesh)`, activations are constrained by
        `parallel.RULES` and the MoE runs expert-parallel.

        With a `cache` the tokens are written to cache slots `positions` (default 0..T-1: a
        prefill) and attend to every earlier slot of their row (absorbed MLA, `MLA.decode`);
        the output carries the updated cache and no MTP logits (`inference.speculative` runs
        the MTP module itself, once the tokens it needs are known).
        """
        c = self.config
        B, T = tokens.shape
        E, N = c.n_routed_experts, c.num_nextn_predict_layers
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is not None and token_mask is not None:
            raise ValueError("give segment_ids (documents and padding) or token_mask (padding only), not both")
        if cache is not None and (segment_ids is not None or token_mask is not None):
            raise ValueError("segment_ids / token_mask cannot be used with a cache (rows hold one sequence each)")
        # no segments: causal over the row, or with a cache each query sees the slots up to its
        # own (MLA.decode)
        if segment_ids is not None:
            starts, token_mask = document_starts(segment_ids), segment_ids != 0
        else:
            starts, token_mask = None, jnp.ones((B, T), bool) if token_mask is None else token_mask.astype(bool)
        cos, sin = rope_cos_sin(c, positions)
        shared = (cos, sin, starts, token_mask)

        x = constrain(self.embed(tokens), "batch", None, None)  # [B,T,D]
        loads, balance = [], jnp.zeros((), jnp.float32)
        caches = {}
        if self.dense_layers is not None:
            with jax.named_scope("dense_layers"):
                if cache is None:
                    x, _ = _scan(self.dense_layers, x, *shared)
                else:
                    x, _, caches["dense"] = scan_cached(self.dense_layers, x, cache.dense, positions, *shared)
        if self.moe_layers is not None:
            with jax.named_scope("moe_layers"):
                if cache is None:
                    x, stats = _scan(self.moe_layers, x, *shared)
                else:
                    x, stats, caches["moe"] = scan_cached(self.moe_layers, x, cache.moe, positions, *shared)
            loads.append(stats["load"])
            balance += stats["balance"].sum()
        h = self.final_norm(x)
        logits = constrain(self.lm_head(h), "batch", None, "act_vocab")

        mtp_logits = mtp_h = None
        if cache is not None:
            expert_load = jnp.concatenate(loads) if loads else jnp.zeros((0, E), jnp.float32)
            new_cache = Cache(caches.get("dense"), caches.get("moe"))
            return ModelOutput(logits, None, expert_load, balance, h, None, new_cache)
        if self.mtp is not None:
            with jax.named_scope("mtp"):
                ahead = jnp.stack([jnp.roll(tokens, -k, axis=1) for k in range(1, N + 1)])  # [N,B,T]
                # position i counts at depth k when it and t_{i+k} exist and are not padding
                exists = jnp.arange(T)[None, :] < T - jnp.arange(1, N + 1)[:, None]  # [N,T]
                ahead_real = jnp.stack([jnp.roll(token_mask, -k, axis=1) for k in range(1, N + 1)])  # [N,B,T]
                xs = (self.embed(ahead), exists[:, None, :] & ahead_real & token_mask[None])

                call = _layer_fn()  # rematerialised like the stacks' layers

                def depth(block, h_prev, x):
                    emb, tok_mask = x
                    return call(block, h_prev, emb, cos, sin, starts, tok_mask)

                _, (mtp_h, stats) = nnx.scan(depth, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))(
                    self.mtp, h, xs)
                mtp_logits = constrain(self.lm_head(mtp_h), None, "batch", None, "act_vocab")  # [N,B,T,V]
            loads.append(stats["load"])
            balance += stats["balance"].sum()
        expert_load = jnp.concatenate(loads) if loads else jnp.zeros((0, E), jnp.float32)
        return ModelOutput(logits, mtp_logits, expert_load, balance, h, mtp_h)
