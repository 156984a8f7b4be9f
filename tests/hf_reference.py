"""HF transformers as the independent numerical reference: configs and modules built from ours."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from dsv3_jax.config import ModelConfig


def hf_config(config: ModelConfig) -> transformers.DeepseekV3Config:
    """The HF config for one of ours (eager attention, fp32)."""
    hf = transformers.DeepseekV3Config(**config.to_hf())
    hf._attn_implementation = "eager"
    return hf


def t2n(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy()


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for what random init leaves trivial: norm weights (ones) and the
    router correction bias (zeros, here including negatives so the -inf group mask matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
