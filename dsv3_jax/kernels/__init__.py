"""Backend-chosen ops, a module each; every op's portable XLA version runs everywhere.

`use(attention=..., grouped_matmul=..., latent_attention=..., scaled_matmul=..., expert_layout=...,
row_gather=..., cross_entropy=..., layer_update=...)`
overrides the backend's choice while tracing.
"""

from dsv3_jax.kernels.choice import use, validate

__all__ = ["use", "validate"]
