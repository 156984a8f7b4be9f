"""Preallocated latent caches (SPEC B, absorb mode) and their size.

Per layer and token the cache holds R + Kr values (kv_lora_rank + qk_rope_head_dim: 576 for
V3), in the compute dtype; per-head keys and values are never stored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.mla import LatentCache
from dsv3_jax.model.transformer import Cache
from dsv3_jax.parallel.mesh import logical_to_spec


def _stack(config: ModelConfig, layers: int, batch: int, size: int, dtype, mesh) -> LatentCache | None:
    if layers == 0:
        return None
    shapes = {"latent": (layers, batch, size, config.kv_lora_rank),
              "k_pe": (layers, batch, size, config.qk_rope_head_dim)}

    def zeros(shape):
        if mesh is None:
            return jnp.zeros(shape, dtype)
        spec = logical_to_spec((None, "batch", None, None), shape, dict(mesh.shape))
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=NamedSharding(mesh, spec))()

    return LatentCache(**{k: zeros(s) for k, s in shapes.items()})


def init_cache(config: ModelConfig, batch: int, size: int, dtype=jnp.bfloat16, mesh=None) -> Cache:
    """Zeroed caches of the main stacks for `batch` rows of `size` slots (batch split over the
    mesh's batch axes when a mesh is given)."""
    return Cache(_stack(config, config.num_dense_layers, batch, size, dtype, mesh),
                 _stack(config, config.num_moe_layers, batch, size, dtype, mesh))


def init_mtp_cache(config: ModelConfig, batch: int, size: int, dtype=jnp.bfloat16, mesh=None) -> LatentCache:
    """The cache of the first MTP depth (the drafter of speculative decoding)."""
    return _stack(config, 1, batch, size, dtype, mesh)


def cache_bytes_per_token(config: ModelConfig, dtype=jnp.bfloat16) -> int:
    """Bytes the main model's cache holds per token: layers x (R + Kr) x itemsize."""
    per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    return config.num_hidden_layers * per_layer * jnp.dtype(dtype).itemsize
