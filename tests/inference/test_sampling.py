"""Sampling distributions against HF transformers' logits warpers (temperature, top-k, top-p)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from dsv3_jax.inference.sampling import Sampling, probabilities


def hf_probabilities(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """HF's warpers in generate's order (temperature, top-k, top-p), then softmax."""
    scores = torch.tensor(logits, dtype=torch.float32)
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    for w in warpers:
        scores = w(None, scores)
    return torch.softmax(scores, -1).numpy()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 0.9), (0.7, 20, 1.0), (1.3, 10, 0.5), (1.0, 0, 0.3)])
def test_random_logits_match_hf(temperature, top_k, top_p):
    logits = np.random.RandomState(0).randn(16, 64).astype(np.float32) * 2
    got = np.asarray(probabilities(jnp.asarray(logits), Sampling(temperature, top_k, top_p)))
    np.testing.assert_allclose(got, hf_probabilities(logits, temperature, top_k, top_p), atol=1e-6)


def test_ties_at_the_top_p_cut_match_hf():
    """Tied tokens at the cut are kept or dropped by position, as HF does, not all kept."""
    logits = np.log(np.array([[1, 1, 1, 1, 1e-9, 1e-9], [3, 2, 2, 2, 2, 1e-9]], np.float32))
    for top_p in (0.5, 0.6, 0.8):
        got = np.asarray(probabilities(jnp.asarray(logits), Sampling(1.0, 0, top_p)))
        np.testing.assert_allclose(got, hf_probabilities(logits, 1.0, 0, top_p), atol=1e-6)
    assert (np.asarray(probabilities(jnp.asarray(logits), Sampling(1.0, 0, 0.5)))[0] > 0).sum() == 2


@pytest.mark.parametrize("field, value", [("temperature", float("nan")), ("temperature", float("inf")),
                                          ("temperature", -1.0), ("top_p", float("nan")), ("top_k", -1)])
def test_bad_settings(field, value):
    with pytest.raises(ValueError, match=field):
        Sampling(**{field: value})
