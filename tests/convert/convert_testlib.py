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


# DeepSeek's inference/convert.py: HF module name -> (official name, model-parallel shard dim),
# restated here (SPEC E) so the layout tests do not trust the converter's own table.
OFFICIAL_MAPPING = {
    "embed_tokens": ("embed", 0), "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None), "q_proj": ("wq", 0), "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None), "q_b_proj": ("wq_b", 0), "kv_a_proj_with_mqa": ("wkv_a", None),
    "kv_a_layernorm": ("kv_norm", None), "kv_b_proj": ("wkv_b", 0), "o_proj": ("wo", 1),
    "gate": ("gate", None), "gate_proj": ("w1", 0), "down_proj": ("w2", 1), "up_proj": ("w3", 0),
    "norm": ("norm", None), "lm_head": ("head", 0),
}


def write_official(hf_dir, out_dir, mp: int, n_experts: int, mtp_layer: int) -> None:
    """Re-slice a HF directory as DeepSeek's inference/convert.py does: rename, narrow each tensor
    along its shard dim into `mp` equal slices (or copy it to every rank), give rank r the routed
    experts [r*E/mp, (r+1)*E/mp) whole, split FP8 scales like their weights, drop the MTP layer."""
    from safetensors.torch import safe_open, save_file  # noqa: PLC0415

    os.makedirs(out_dir)
    per_rank = n_experts // mp
    state_dicts = [{} for _ in range(mp)]
    for file in sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors")):
        with safe_open(os.path.join(hf_dir, file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.startswith(f"model.layers.{mtp_layer}."):
                    continue
                param = f.get_tensor(name)
                name = name.removeprefix("model.")
                for old, new in (("self_attn", "attn"), ("mlp", "ffn"), ("weight_scale_inv", "scale"),
                                 ("e_score_correction_bias", "bias")):
                    name = name.replace(old, new)
                key = name.split(".")[-2]
                new_key, dim = OFFICIAL_MAPPING[key]
                name = name.replace(key, new_key)
                for i in range(mp):
                    if "experts" in name and "shared_experts" not in name:
                        if not i * per_rank <= int(name.split(".")[-3]) < (i + 1) * per_rank:
                            continue
                        state_dicts[i][name] = param
                    elif dim is not None:
                        assert param.size(dim) % mp == 0, (name, param.shape, mp)
                        size = param.size(dim) // mp
                        state_dicts[i][name] = param.narrow(dim, i * size, size).contiguous()
                    else:
                        state_dicts[i][name] = param
    for i in range(mp):
        save_file(state_dicts[i], os.path.join(out_dir, f"model{i}-mp{mp}.safetensors"))


def model_args(cfg: dict) -> dict:
    """DeepSeek's ModelArgs json (configs/config_671B.json field names) for a HF config dict."""
    return dict(vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], inter_dim=cfg["intermediate_size"],
                moe_inter_dim=cfg["moe_intermediate_size"], n_layers=cfg["num_hidden_layers"],
                n_dense_layers=cfg["first_k_dense_replace"], n_heads=cfg["num_attention_heads"],
                n_routed_experts=cfg["n_routed_experts"], n_shared_experts=cfg["n_shared_experts"],
                n_activated_experts=cfg["num_experts_per_tok"], n_expert_groups=cfg["n_group"],
                n_limited_groups=cfg["topk_group"], route_scale=cfg["routed_scaling_factor"],
                score_func="sigmoid", q_lora_rank=cfg["q_lora_rank"] or 0, kv_lora_rank=cfg["kv_lora_rank"],
                qk_nope_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
                v_head_dim=cfg["v_head_dim"], max_seq_len=cfg["max_position_embeddings"], dtype="bf16")


def to_torch(a: np.ndarray) -> torch.Tensor:
    """A numpy tensor (incl. bf16 / e4m3 from ml_dtypes) as a torch tensor, bit for bit."""
    views = {BF16: (np.int16, torch.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn): (np.uint8, torch.float8_e4m3fn)}
    if a.dtype in views:
        raw, dtype = views[a.dtype]
        return torch.from_numpy(a.view(raw).copy()).view(dtype)
    return torch.from_numpy(a.copy())
