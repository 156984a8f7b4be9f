"""dsv3_jax: DeepSeek-V3 in JAX / Flax NNX."""

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3, ModelOutput, RouterBias

__all__ = ["DeepSeekV3", "ModelConfig", "ModelOutput", "RouterBias"]
