"""Bits per byte equals a hand computation; windows score every token once; multiple choice."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.eval import bits_per_byte, choice_scores, windows
from dsv3_jax.model import DeepSeekV3

CONFIG = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def model():
    return DeepSeekV3(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.float32)


@nnx.jit
def _logits(model, tokens):
    """The hand computations' forward, one sequence [T] -> [T,V] (jitted: op by op it dominated the tests)."""
    return model(tokens[None]).logits[0]


def test_windows_score_each_token_once():
    for n, w, s in ((5, 8, 4), (40, 16, 8), (41, 16, 5)):
        scored = [t for b, e, f in windows(n, w, s) for t in range(f, e)]
        assert scored == list(range(1, n))
        assert all(e - b <= w and b < f for b, e, f in windows(n, w, s))
    with pytest.raises(ValueError, match="stride"):
        windows(10, 8, 8)


def test_bits_per_byte_equals_hand_computation(model):
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, 12)
    logits = np.asarray(_logits(model, jnp.asarray(tokens)), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits - top).sum(-1, keepdims=True)) - top
    hand = -sum(logp[t, tokens[t + 1]] for t in range(11)) / np.log(2) / 30
    assert bits_per_byte(model, tokens, 30, window=16)["bits_per_byte"] == pytest.approx(hand, rel=1e-5)
    # window 8, stride 4: tokens 1-7 scored in the window [0, 8), tokens 8-11 in [4, 12) (four of context)
    def logp_of(window, begin):
        lg = np.asarray(_logits(model, jnp.asarray(window)), np.float64)
        lp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
        return {begin + t + 1: lp[t, window[t + 1]] for t in range(len(window) - 1)}

    first, second = logp_of(tokens[0:8], 0), logp_of(tokens[4:12], 4)
    hand_short = -(sum(first[t] for t in range(1, 8)) + sum(second[t] for t in range(8, 12))) / np.log(2) / 30
    short = bits_per_byte(model, tokens, 30, window=8, stride=4)
    assert short["windows"] == 2 and short["bits_per_byte"] == pytest.approx(hand_short, rel=1e-5)


def test_choice_scores_sum_continuation_logprobs(model):
    ctx, cont = [3, 9, 27], [81, 5]
    logits = np.asarray(jax.nn.log_softmax(_logits(model, jnp.asarray(ctx + cont)), -1))
    hand = logits[2, 81] + logits[3, 5]
    got = choice_scores(model, [ctx, ctx], [cont, [7]])
    assert got[0] == pytest.approx(hand, rel=1e-5)
    with pytest.raises(ValueError, match="at least one token"):
        choice_scores(model, [ctx], [[]])


def test_lengths_up_to_max_position_embeddings_fit(model):
    """150 tokens fit a model of 200 positions (the padded batch stops at 200, not 256); 201 do not."""
    small = DeepSeekV3(dataclasses.replace(CONFIG, max_position_embeddings=200), rngs=nnx.Rngs(0),
                       dtype=jnp.float32)
    ctx = list(np.random.default_rng(1).integers(0, CONFIG.vocab_size, 148))
    got = choice_scores(small, [ctx], [[5, 6]])
    logp = np.asarray(jax.nn.log_softmax(small(jnp.asarray([ctx + [5, 6]])).logits[0], -1))
    assert got[0] == pytest.approx(logp[147, 5] + logp[148, 6], rel=1e-5)
    with pytest.raises(ValueError, match="201 tokens exceeds max_position_embeddings=200"):
        choice_scores(small, [ctx + [1] * 51], [[5, 6]])


def test_bad_window_and_stride(model):
    tokens = list(range(1, 12))
    with pytest.raises(ValueError, match="stride=0"):
        bits_per_byte(model, tokens, 30, window=8, stride=0)
    with pytest.raises(ValueError, match="window=1"):
        bits_per_byte(model, tokens, 30, window=1)


def test_scoring_on_a_mesh_equals_one_device(model):
    """A batch of 3 rows over 4 batch shards is rounded up to 4 rows; the sharded model scores as
    the one-device one."""
    from dsv3_jax import parallel  # noqa: PLC0415

    mesh = parallel.make_mesh("data=2,expert=2,tensor=2")
    sharded = parallel.create_model(CONFIG, mesh, seed=0, dtype=jnp.float32)
    tokens = np.random.RandomState(3).randint(0, CONFIG.vocab_size, 40)
    want, got = (bits_per_byte(m, tokens, 100, window=16, batch=3, mesh=ms) for m, ms in ((model, None),
                                                                                            (sharded, mesh)))
    np.testing.assert_allclose(got.pop("nats_per_token"), want.pop("nats_per_token"), rtol=1e-5)
    np.testing.assert_allclose(got.pop("bits_per_byte"), want.pop("bits_per_byte"), rtol=1e-5)
    assert got == want
    contexts, conts = [[1, 2, 3], [4, 5]], [[6], [7, 8]]
    np.testing.assert_allclose(choice_scores(sharded, contexts, conts, batch=3, mesh=mesh),
                               choice_scores(model, contexts, conts), rtol=1e-5)
