"""Inference: latent caches, prefill/decode, sampling, MTP speculative decoding, loading."""

from dsv3_jax.inference.cache import cache_bytes_per_token, init_cache, init_mtp_cache
from dsv3_jax.inference.checkpoint import load_model, load_weights, stored_config
from dsv3_jax.inference.decode import GenerateResult, check_prompts, generate
from dsv3_jax.inference.sampling import Sampling, probabilities, sample

__all__ = ["GenerateResult", "Sampling", "cache_bytes_per_token", "check_prompts", "generate", "init_cache",
           "init_mtp_cache", "load_model", "load_weights", "probabilities", "sample", "stored_config"]
