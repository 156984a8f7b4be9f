"""Batched generation over the latent cache: one prefill, then one jitted step per token (or
per speculative round), every shape fixed by the bucket so each bucket compiles once.

Prompts are right-padded to a power-of-two bucket; row b's prompt fills cache slots
0..len_b-1 and each new token the next slot, rotary position = slot. A query sees every slot
up to its own (`kernels.latent_attention.cache_mask`), so padding and rejected drafts past a
row's length are never read before they are overwritten.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.inference import speculative
from dsv3_jax.inference.cache import init_cache, init_mtp_cache
from dsv3_jax.inference.sampling import Sampling, probabilities, sample
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.model.mla import LatentCache
from dsv3_jax.model.transformer import Cache, full_depth, scan_unroll
from dsv3_jax.parallel.mesh import batch_sharding, fetch, padded_rows, place

MIN_BUCKET = 16
SLOT_ROUNDING = 64  # the room for new tokens is rounded up to this


class DecodeState(NamedTuple):
    cache: Cache
    mtp_cache: LatentCache | None  # speculative only
    lengths: jax.Array  # [B] slots filled in the main cache
    token: jax.Array  # [B] the last emitted token (not in the cache yet)
    draft: jax.Array  # [B] the MTP guess at the token after `token` (speculative only)
    out: jax.Array  # [B,N] emitted tokens
    count: jax.Array  # [B] tokens emitted
    done: jax.Array  # [B] bool: stop token emitted or N reached
    key: jax.Array
    step: jax.Array  # [] rounds run (the sampling key is folded with it)
    drafted: jax.Array  # [] drafts verified
    accepted: jax.Array  # [] drafts accepted


class GenerateResult(NamedTuple):
    tokens: list[list[int]]  # new tokens per prompt, through the first stop token
    steps: int  # decode steps after the prefill
    drafted: int  # speculative: drafts verified
    accepted: int  # speculative: drafts accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


def bucket(n: int) -> int:
    """The padded prompt length: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def cache_size(prompt_len: int, max_new_tokens: int) -> int:
    """Slots for a padded prompt plus the new tokens (+1: a round may write one slot ahead)."""
    return prompt_len + -(-(max_new_tokens + 1) // SLOT_ROUNDING) * SLOT_ROUNDING


def _emit(out, count, done, token, write, stops: tuple[int, ...], max_new: int):
    """Append token [B] to the rows where `write` and not done; update counts and done."""
    write = write & ~done
    B, N = out.shape
    out = out.at[jnp.arange(B), jnp.where(write, count, N)].set(token, mode="drop")
    count = count + write
    stop = jnp.isin(token, jnp.asarray(stops, jnp.int32)) if stops else jnp.zeros_like(write)
    return out, count, done | (write & stop) | (count >= max_new)


def _last(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B,T,...] at T-index [B] -> [B,...]."""
    return jnp.take_along_axis(x, index.reshape(-1, *(1,) * (x.ndim - 1)), axis=1)[:, 0]


_JITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Decode steps on GPU: XLA's command buffer runs kernels that share no buffers concurrently
# (its default orders them one after another), so the router and shared-expert chains of
# small kernels overlap the expert GEMMs that stream the weights.
GPU_STEP_OPTIONS = {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}


def _jitted(model: DeepSeekV3, fn, donate: tuple[int, ...], **static):
    """jax.jit of fn(graphdef, state, *args, **static) with the model's graphdef closed over (it
    holds the config, which is not hashable); kept per model so each bucket compiles once."""
    per_model = _JITTED.setdefault(model, {})
    key = (fn, tuple(sorted(static.items())))
    if key not in per_model:
        graphdef = nnx.graphdef(model)
        per_model[key] = jax.jit(functools.partial(fn, graphdef, **static), donate_argnums=donate,
                                 compiler_options=_compiler_options(fn))
    return per_model[key]


def _compiler_options(fn) -> dict | None:
    """GPU_STEP_OPTIONS for the decode steps on GPU (bench shape on an H200: 2.56 -> 2.27 ms a
    step; the training step gains nothing and takes 12 GiB more, so only here), else None."""
    return GPU_STEP_OPTIONS if fn is not prefill and jax.default_backend() == "gpu" else None


def prefill(graphdef, state, prompts, lengths, cache, mtp_cache, key, *, sampling: Sampling,
            stops: tuple[int, ...], max_new: int) -> tuple[DecodeState, jax.Array]:
    """Fill the cache with right-padded prompts [B,P] (lengths [B]) and sample the first token;
    with an MTP cache, also fill it and draft the token after that. -> (state, all rows done)."""
    model = nnx.merge(graphdef, state)
    B, P = prompts.shape
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    o = model(prompts, positions=positions, cache=cache)
    h_last = _last(o.hidden_states, lengths - 1)  # [B,D]; the head runs on these rows only
    first = sample(jax.random.fold_in(key, 0), probabilities(model.lm_head(h_last), sampling), sampling)
    out, count, done = _emit(jnp.zeros((B, max_new), jnp.int32), jnp.zeros((B,), jnp.int32),
                             jnp.zeros((B,), bool), first, jnp.ones((B,), bool), stops, max_new)
    guess = jnp.zeros((B,), jnp.int32)
    if mtp_cache is not None:
        ahead = jnp.roll(prompts, -1, axis=1).at[jnp.arange(B), lengths - 1].set(first)  # t_{i+1}
        guess, mtp_cache = speculative.draft(model, o.hidden_states, ahead, positions, mtp_cache, lengths - 1)
    zero = jnp.zeros((), jnp.int32)
    state = DecodeState(o.cache, mtp_cache, lengths, first, guess, out, count, done, key, zero + 1, zero, zero)
    return state, done.all()


def _unrolled(model: DeepSeekV3):
    """Decode steps run their layers unrolled. Inside the layer loop each layer's weights are a
    slice at a traced index, which XLA's GPU matmuls do not read in place: every weight was
    copied every step (bench shape on an H200: 5.2 ms a step looped, 2.4 ms unrolled). The
    prefill, run once per call, keeps the loop (and its shorter compile)."""
    return scan_unroll(full_depth(model.config))


def step(graphdef, state, s: DecodeState, *, sampling: Sampling, stops: tuple[int, ...], max_new: int
         ) -> tuple[DecodeState, jax.Array]:
    """One token per row: feed `s.token` at slot `s.lengths`, sample the next."""
    model = nnx.merge(graphdef, state)
    live = ~s.done
    with _unrolled(model):
        o = model(s.token[:, None], positions=s.lengths[:, None], cache=s.cache)
    token = sample(jax.random.fold_in(s.key, s.step), probabilities(o.logits[:, 0], sampling), sampling)
    out, count, done = _emit(s.out, s.count, s.done, token, live, stops, max_new)
    return s._replace(cache=o.cache, lengths=s.lengths + live, token=token, out=out, count=count, done=done,
                      step=s.step + 1), done.all()


def speculative_step(graphdef, state, s: DecodeState, *, sampling: Sampling, stops: tuple[int, ...],
                     max_new: int) -> tuple[DecodeState, jax.Array]:
    """One round (`speculative`): verify the draft, emit one or two tokens per row, draft again."""
    model = nnx.merge(graphdef, state)
    live = ~s.done
    positions = s.lengths[:, None] + jnp.arange(2, dtype=jnp.int32)  # [B,2]
    with _unrolled(model):
        o = model(jnp.stack([s.token, s.draft], 1), positions=positions, cache=s.cache)
    probs = probabilities(o.logits, sampling)  # [B,2,V]
    k_verify, k_next = jax.random.split(jax.random.fold_in(s.key, s.step))
    accepted, first = speculative.verify(probs[:, 0], s.draft, k_verify, sampling)
    second = sample(k_next, probs[:, 1], sampling)
    out, count, done = _emit(s.out, s.count, s.done, first, live, stops, max_new)
    out, count, done = _emit(out, count, done, second, live & accepted, stops, max_new)
    guess, mtp_cache = speculative.draft(model, o.hidden_states, jnp.stack([first, second], 1), positions,
                                         s.mtp_cache, accepted.astype(jnp.int32))
    return s._replace(cache=o.cache, mtp_cache=mtp_cache, lengths=s.lengths + live * (1 + accepted),
                      token=jnp.where(accepted, second, first), draft=guess, out=out, count=count, done=done,
                      step=s.step + 1, drafted=s.drafted + live.sum(),
                      accepted=s.accepted + (live & accepted).sum()), done.all()


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    """ValueError naming the first empty prompt or out-of-vocabulary token id."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        bad = [int(t) for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


def generate(model: DeepSeekV3, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (), seed: int = 0,
             max_len: int | None = None, speculative: bool = False, mesh=None,
             stream: Callable[[int, list[int]], None] | None = None) -> GenerateResult:
    """Continue each prompt (token ids; lengths may differ) by up to `max_new_tokens` tokens.

    temperature 0 is greedy; top_k / top_p restrict sampling; a row stops after emitting any of
    `stop_tokens`. `max_len` fixes the cache slots (default: the prompt bucket plus room for
    the new tokens); a prompt that does not fit raises ValueError. `speculative` drafts with the
    MTP module (identical output distribution; `GenerateResult.acceptance_rate`). With a
    `mesh`, rows are split over its batch axes (padded to a multiple) and the MoE runs
    expert-parallel; over several processes, each passes the same prompts and gets every row's
    result. `stream(row, new_token_ids)` is called after every step (this waits for
    each step; without it the host runs ahead of the device).
    """
    config = model.config
    check_prompts(prompts, config.vocab_size)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if speculative and model.mtp is None:
        raise ValueError("speculative decoding needs the MTP module (num_nextn_predict_layers >= 1)")
    sampling = Sampling(temperature, top_k, top_p)
    longest = max(len(p) for p in prompts)
    P = bucket(longest)
    size = cache_size(P, max_new_tokens) if max_len is None else max_len
    need = longest + max_new_tokens + 1
    if need > size:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) + 1 needs "
                         f"{need} cache slots, but max_len={size}")
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings={config.max_position_embeddings}")
    P = min(P, size)
    rows = len(prompts)
    B = padded_rows(rows, mesh)
    tokens = np.zeros((B, P), np.int32)
    lengths = np.ones((B,), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        lengths[i] = len(p)
    if mesh is not None:  # every process passes the same prompts; each places its rows
        tokens = place(tokens, batch_sharding(mesh))
        lengths = place(lengths, batch_sharding(mesh, ndim=1))
    dtype = model.embed.dtype
    state = nnx.state(model)
    static = dict(sampling=sampling, stops=tuple(int(t) for t in stop_tokens), max_new=max_new_tokens)
    reported = [0] * rows

    def flush(s: DecodeState) -> None:
        out, count = fetch((s.out, s.count))
        for r in range(rows):
            if count[r] > reported[r]:
                stream(r, out[r, reported[r]: count[r]].tolist())
                reported[r] = int(count[r])

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        s, finished = _jitted(model, prefill, (3, 4), **static)(
            state, tokens, lengths, init_cache(config, B, size, dtype, mesh),
            init_mtp_cache(config, B, size, dtype, mesh) if speculative else None, jax.random.key(seed))
        one_step = _jitted(model, speculative_step if speculative else step, (1,), **static)
        steps, before = 0, None  # `before`: whether the state before the newest one had finished
        while steps < max_new_tokens - 1:
            if stream is not None:
                flush(s)  # waits for the newest step anyway
                if bool(fetch(finished)):
                    break
            elif before is not None and bool(fetch(before)):  # the newest step had nothing to do
                break  # (checking one step behind keeps a step queued on the device)
            before = finished
            s, finished = one_step(state, s)
            steps += 1
        if stream is not None:
            flush(s)
        out, count, drafted, accepted = fetch((s.out, s.count, s.drafted, s.accepted))
    return GenerateResult([out[r, : count[r]].tolist() for r in range(rows)], steps, int(drafted), int(accepted))
