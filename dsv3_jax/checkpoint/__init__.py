"""Training checkpoints: one Orbax manager for model, optimizer, router biases, data and step."""

from dsv3_jax.checkpoint.manager import Checkpointer

__all__ = ["Checkpointer"]
