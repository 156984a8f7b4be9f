"""Evaluation: bits per byte (sliding window) and multiple-choice log-likelihood scoring."""

from dsv3_jax.eval.scoring import bits_per_byte, choice_scores, token_logprobs, windows

__all__ = ["bits_per_byte", "choice_scores", "token_logprobs", "windows"]
