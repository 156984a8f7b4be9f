"""Tiny HF DeepSeek-V3 checkpoints for the conversion tests (random init, written to disk)."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
            first_k_dense_replace=1, norm_topk_prob=True, num_nextn_predict_layers=1,
            max_position_embeddings=64, rms_norm_eps=1e-6)


def hf_config(**overrides) -> DeepseekV3Config:
    kw = {**BASE, **overrides}
    if kw.pop("yarn", False):
        kw["rope_parameters"] = dict(YARN)
    return DeepseekV3Config(**kw, attn_implementation="eager")


def _perturb(model: DeepseekV3ForCausalLM, seed: int) -> None:
    """Non-zero (also negative) correction biases and non-unit norms, so both are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
        for name, t in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))


def _cast(model: DeepseekV3ForCausalLM, dtype) -> DeepseekV3ForCausalLM:
    """Cast like `from_pretrained(dtype=...)`: the router gate and its bias stay fp32 (HF 5)."""
    model = model.to(dtype)
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            module.float()
    return model


def make_hf(directory, seed: int = 0, mtp: bool = True, dtype=torch.float32, **overrides):
    """Save a random tiny HF model to `directory`; with `mtp`, add the MTP layer tensors
    (`model.layers.{L}.*`) in a second shard with an index, as the released checkpoint has them.
    Returns the (fp32 or `dtype`) torch model."""
    torch.manual_seed(seed)
    cfg = hf_config(**overrides)
    model = DeepseekV3ForCausalLM(cfg).eval()
    _perturb(model, seed)
    model = _cast(model, dtype)
    model.save_pretrained(directory)
    if mtp:
        add_mtp(directory, cfg, seed, dtype)
    return model


def add_mtp(directory, cfg: DeepseekV3Config, seed: int, dtype) -> None:
    """Write MTP layer tensors: a MoE decoder layer from a 1-layer model, plus the MTP extras."""
    torch.manual_seed(seed + 1000)
    one = DeepseekV3ForCausalLM(DeepseekV3Config(**{**cfg.to_dict(), "num_hidden_layers": 1,
                                                    "first_k_dense_replace": 0})).eval()
    _perturb(one, seed + 1000)
    tmp = os.path.join(directory, "_one")
    _cast(one, dtype).save_pretrained(tmp)
    main = load_tensors(directory)
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    prefix = f"model.layers.{L}."
    mtp = {prefix + k[len("model.layers.0."):]: v for k, v in load_tensors(tmp).items()
           if k.startswith("model.layers.0.")}
    rng = np.random.RandomState(seed)
    wdtype = main["model.norm.weight"].dtype
    mtp[prefix + "enorm.weight"] = (1 + 0.2 * rng.randn(D)).astype(wdtype)
    mtp[prefix + "hnorm.weight"] = (1 + 0.2 * rng.randn(D)).astype(wdtype)
    mtp[prefix + "shared_head.norm.weight"] = (1 + 0.2 * rng.randn(D)).astype(wdtype)
    mtp[prefix + "eh_proj.weight"] = (0.05 * rng.randn(D, 2 * D)).astype(wdtype)
    mtp[prefix + "embed_tokens.weight"] = main["model.embed_tokens.weight"]
    mtp[prefix + "shared_head.head.weight"] = main["lm_head.weight"]
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)
    save_file(mtp, os.path.join(directory, "model-mtp.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model.safetensors" for k in main} | {k: "model-mtp.safetensors" for k in mtp}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def load_tensors(directory) -> dict[str, np.ndarray]:
    """Every tensor of a HF directory (any dtype, incl. float8) via our own header-checked reader."""
    from dsv3_jax.convert.safetensors_io import Reader  # noqa: PLC0415

    r = Reader(directory)
    return {n: r.get(n) for n in sorted(r.names())}


def hf_logits(model: DeepseekV3ForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def dequantize_reference(w8: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Independent block dequantization: loop over 128x128 blocks."""
    out = w8.astype(np.float32)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            out[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128] *= scale[bi, bj]
    return out


BF16 = np.dtype(ml_dtypes.bfloat16)
