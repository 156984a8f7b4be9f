"""Training data: sources, tokenizer, Grain pipeline (tokenize, pack with segment ids, batch)."""

from dsv3_jax.data.pipeline import DataConfig, make_iterator
from dsv3_jax.data.tokenizer import load_or_train_tokenizer

__all__ = ["DataConfig", "load_or_train_tokenizer", "make_iterator"]
