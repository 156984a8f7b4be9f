"""DeepSeek-V3 checkpoints (HF safetensors BF16/FP32 or block FP8, DeepSeek's inference layout,
PyTorch state dicts) <-> dsv3_jax params and Orbax checkpoints."""

from dsv3_jax.convert.checkpoint import convert_hf, load_checkpoint, open_params, save_checkpoint
from dsv3_jax.convert.hf import load_hf, save_hf
from dsv3_jax.convert.layouts import LAYOUTS, detect_layout
from dsv3_jax.convert.safetensors_io import CheckpointError

__all__ = ["LAYOUTS", "CheckpointError", "detect_layout", "convert_hf", "load_checkpoint", "load_hf",
           "open_params", "save_checkpoint", "save_hf"]
