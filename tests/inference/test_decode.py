"""Latent-cache decoding: cached logits = a full forward at every step, absorbed MLA = a naive
full K/V cache, generation on a mesh = on one device, and clear errors for bad inputs (fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.inference import cache_bytes_per_token, generate, init_cache
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.model.mla import MLA, CacheView, LatentCache
from dsv3_jax.model.rope import rope_cos_sin
from dsv3_jax.parallel import create_model, make_mesh

CONFIG = ModelConfig.preset("tiny")
PROMPTS = [[5, 17, 99, 3, 250], [7, 1, 2, 300, 41, 42, 8, 9, 10], [11]]


@pytest.fixture(scope="module")
def model():
    return DeepSeekV3(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.float32)


def test_cache_bytes_per_token():
    assert cache_bytes_per_token(ModelConfig.preset("v3_671b")) == 70_272  # 61 layers x 576 x 2 bytes
    assert cache_bytes_per_token(CONFIG, jnp.float32) == 3 * (32 + 8) * 4


def test_cached_logits_equal_full_forward_at_every_step(model):
    """Prefill right-padded prompts of different lengths, then feed one known token per step:
    each step's logits equal the full forward over the whole sequence so far."""
    rng = np.random.default_rng(0)
    steps = 4
    seqs = [p + rng.integers(0, CONFIG.vocab_size, steps).tolist() for p in PROMPTS]
    lens = np.array([len(p) for p in PROMPTS])
    B, P = len(PROMPTS), 16
    prompts = np.zeros((B, P), np.int32)
    for i, p in enumerate(PROMPTS):
        prompts[i, : len(p)] = p
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, positions, cache):
        out = nnx.merge(graphdef, state)(tokens, positions=positions, cache=cache)
        return out.logits, out.cache

    cache = init_cache(CONFIG, B, 32, jnp.float32)
    logits, cache = run(state, prompts, np.broadcast_to(np.arange(P, dtype=np.int32), (B, P)), cache)
    cached = [[np.asarray(logits[i, n - 1])] for i, n in enumerate(lens)]
    for t in range(steps):
        tok = np.array([s[n + t] for s, n in zip(seqs, lens)], np.int32)
        logits, cache = run(state, tok[:, None], (lens + t)[:, None].astype(np.int32), cache)
        for i in range(B):
            cached[i].append(np.asarray(logits[i, 0]))
    full = full_logits(model, seqs)
    for i, s in enumerate(seqs):
        np.testing.assert_allclose(np.stack(cached[i]), full[i, lens[i] - 1: len(s)], rtol=1e-5, atol=1e-5)


def naive_decode(attn: MLA, x, cos, sin, k_cache, v_cache, slots):
    """Reference (tests only): cache every head's full key [B,S,H,Kn+Kr] and value [B,S,H,Kv]."""
    c = attn.config
    B, T, _ = x.shape
    H, Kn, Kr, Kv = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    q, latent, k_pe = attn._project(x, cos, sin)
    kv = attn.kv_b_proj(latent).reshape(B, T, H, Kn + Kv)
    k = jnp.concatenate([kv[..., :Kn], jnp.broadcast_to(k_pe[:, :, None], (B, T, H, Kr))], -1)
    rows = jnp.arange(B)[:, None]
    k_cache, v_cache = k_cache.at[rows, slots].set(k), v_cache.at[rows, slots].set(kv[..., Kn:])
    scores = jnp.einsum("bthk,bshk->bhts", q, k_cache) * c.softmax_scale
    scores = jnp.where(slots[:, None, :, None] >= jnp.arange(k_cache.shape[1]), scores, -jnp.inf)
    o = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(scores, -1), v_cache)
    return attn.o_proj(o.reshape(B, T, H * Kv)), k_cache, v_cache


def test_absorbed_equals_naive_cache():
    c = CONFIG
    graphdef, state = nnx.split(MLA(c, rngs=nnx.Rngs(1), dtype=jnp.float32, param_dtype=jnp.float32))
    B, S, H = 2, 12, c.num_attention_heads
    x = jax.random.normal(jax.random.key(0), (B, 8, c.hidden_size))
    cache = LatentCache(jnp.zeros((1, B, S, c.kv_lora_rank)), jnp.zeros((1, B, S, c.qk_rope_head_dim)))
    k_cache = jnp.zeros((B, S, H, c.qk_head_dim))
    v_cache = jnp.zeros((B, S, H, c.v_head_dim))

    @jax.jit  # one compilation a step length (op by op, the steps took ~16 s)
    def both(xt, slots, cache, k_cache, v_cache):
        attn = nnx.merge(graphdef, state)
        cos, sin = rope_cos_sin(c, slots)
        ours, cache = attn.decode(xt, cos, sin, CacheView(cache, jnp.int32(0), slots))
        return ours, cache, *naive_decode(attn, xt, cos, sin, k_cache, v_cache, slots)

    for start, T in ((0, 5), (5, 1), (6, 2), (8, 1)):  # prefill, then steps of 1 and 2 tokens
        slots = jnp.broadcast_to(jnp.arange(start, start + T), (B, T))
        xt = x[:, start: start + T] if start + T <= 8 else x[:, :T]
        ours, cache, ref, k_cache, v_cache = both(xt, slots, cache, k_cache, v_cache)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-6)


def full_logits(model, seqs, length=16):
    """Uncached forward of right-padded rows (one compile): [B,length,V] (causal: padding after a
    row's tokens changes nothing before it)."""
    rows = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        rows[i, : len(s)] = s
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda st, t: nnx.merge(graphdef, st)(t).logits)(state, rows))


def test_generate_greedy_equals_full_forward_argmax(model):
    result = generate(model, PROMPTS, 5)
    seqs = [list(p) for p in PROMPTS]
    for _ in range(5):
        logits = full_logits(model, seqs)
        for i, s in enumerate(seqs):
            s.append(int(np.argmax(logits[i, len(s) - 1])))
    assert result.tokens == [s[len(p):] for s, p in zip(seqs, PROMPTS)]
    again = generate(model, PROMPTS, 5)
    assert again.tokens == result.tokens


def test_gpu_step_options_are_valid_xla_options_and_change_no_token(model, monkeypatch):
    """Decode steps on GPU compile with GPU_STEP_OPTIONS (the prefill and other backends with
    none); forced here on the CPU, where XLA accepts and ignores GPU options, the tokens match."""
    from dsv3_jax.inference import decode

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert decode._compiler_options(decode.step) == decode._compiler_options(decode.speculative_step) \
        == decode.GPU_STEP_OPTIONS
    assert decode._compiler_options(decode.prefill) is None
    monkeypatch.undo()
    assert decode._compiler_options(decode.step) is None
    monkeypatch.setattr(decode, "_compiler_options", lambda fn: decode.GPU_STEP_OPTIONS)
    fresh = DeepSeekV3(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.float32)  # its own jit cache
    assert generate(fresh, PROMPTS, 5).tokens == generate(model, PROMPTS, 5).tokens


def test_stop_tokens_and_sampling_seed(model):
    greedy = generate(model, PROMPTS, 5).tokens
    stop = greedy[0][2]
    stopped = generate(model, PROMPTS, 5, stop_tokens=[stop]).tokens
    assert stopped[0] == greedy[0][: greedy[0].index(stop) + 1]
    a = generate(model, PROMPTS, 5, temperature=1.0, top_k=20, top_p=0.9, seed=3).tokens
    b = generate(model, PROMPTS, 5, temperature=1.0, top_k=20, top_p=0.9, seed=3).tokens
    c = generate(model, PROMPTS, 5, temperature=1.0, top_k=20, top_p=0.9, seed=4).tokens
    assert a == b and a != c


def test_generate_on_a_mesh_equals_one_device(model):
    mesh = make_mesh("data=2,expert=4")
    prompts = PROMPTS * 3  # 9 rows: padded to 16 (a multiple of the 8 batch shards)
    with jax.set_mesh(mesh):
        sharded = create_model(CONFIG, mesh, seed=0, dtype=jnp.float32, param_dtype=jnp.float32)
    got = generate(sharded, prompts, 4, mesh=mesh).tokens
    assert got == generate(model, prompts, 4).tokens


def test_bf16_batch_decodes_each_row_as_alone():
    """bf16 with several rows (XLA's CPU runtime once refused the value product's layout)."""
    model = DeepSeekV3(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    prompts = [[5, 17, 99, 3], [7, 1, 2, 300]]
    batched = generate(model, prompts, 3).tokens
    assert batched == [generate(model, [p], 3).tokens[0] for p in prompts]


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 2)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 512\): \[512\]"):
        generate(model, [[1, 512]], 2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[-1]], 2)
    with pytest.raises(ValueError, match="needs 23 cache slots, but max_len=16"):
        generate(model, [list(range(20))], 2, max_len=16)
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        generate(model, [list(range(250))], 10)
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, [], 2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 2, temperature=1.0, top_p=0.0)
