"""The DeepSeek-V3 model in Flax NNX."""

from dsv3_jax.model.moe import RouterBias
from dsv3_jax.model.transformer import DecoderLayer, DeepSeekV3, ModelOutput

__all__ = ["DecoderLayer", "DeepSeekV3", "ModelOutput", "RouterBias"]
