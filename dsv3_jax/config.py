"""ModelConfig: the HF `config.json` of DeepSeek-V3 as a frozen dataclass, with presets.

Field names are the HF names, so `from_hf` / `to_hf` are a rename-free copy. Fields we do not
model (`architectures`, `quantization_config`, `auto_map`, ...) are kept in `extra` and written
back, and the source's key order is remembered, so the released 671B config.json round-trips
exactly. Defaults are the released 671B values (SPEC A).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from typing import Any


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# The rope_scaling keys each rope type reads (`model.rope`, HF's meaning), with what their values
# must be; any other key would be ignored, so it is refused. "type"/"rope_type" name the type.
_OPTIONAL_NUMBER = (lambda v: v is None or _number(v), "a number or null")
_ROPE_KEYS: dict[str, dict[str, tuple]] = {
    "default": {},
    "yarn": {
        "factor": (lambda v: _number(v) and v >= 1, "a number >= 1"),
        "original_max_position_embeddings": (lambda v: _int(v) and v > 0, "a positive int"),
        "beta_fast": _OPTIONAL_NUMBER, "beta_slow": _OPTIONAL_NUMBER, "mscale": _OPTIONAL_NUMBER,
        "mscale_all_dim": _OPTIONAL_NUMBER, "attention_factor": _OPTIONAL_NUMBER,
        "truncate": (lambda v: isinstance(v, bool), "true or false"),
    },
}

# Other names transformers' DeepseekV3Config reads for our fields (its attribute_map).
_HF_ALIASES = {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # unused by MLA; kept for HF compatibility
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 1
    seq_aux: bool = True  # remote-code field: balance loss per sequence (V3); False: over the batch (GShard style)
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000
    rope_scaling: dict | None = dataclasses.field(
        default_factory=lambda: {
            "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096, "type": "yarn",
        }
    )
    max_position_embeddings: int = 163840
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    # HF fields we carry but do not model, and the source key order (for an exact round trip).
    extra: dict = dataclasses.field(default_factory=dict, compare=False)
    hf_keys: tuple = dataclasses.field(default=(), compare=False, repr=False)

    def __post_init__(self):
        def need(ok: bool, field: str, constraint: str):
            if not ok:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {constraint}")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                  "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
                  "n_group", "topk_group", "max_position_embeddings"):
            need(_int(getattr(self, f)) and getattr(self, f) > 0, f, "must be a positive int")
        for f in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            need(_int(getattr(self, f)) and getattr(self, f) >= 0, f, "must be an int >= 0")
        for f in ("rms_norm_eps", "rope_theta", "routed_scaling_factor"):
            need(_number(getattr(self, f)) and getattr(self, f) > 0, f, "must be a positive number")
        for f in ("norm_topk_prob", "seq_aux", "tie_word_embeddings", "attention_bias"):
            need(isinstance(getattr(self, f), bool), f, "must be true or false")
        need(self.q_lora_rank is None or _int(self.q_lora_rank) and self.q_lora_rank > 0, "q_lora_rank",
             "must be None or a positive int")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (rotary pairs)")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"must be <= n_routed_experts={self.n_routed_experts}")
        need(self.n_routed_experts % self.n_group == 0, "n_group",
             f"must divide n_routed_experts={self.n_routed_experts}")
        need(self.n_routed_experts // self.n_group >= 2, "n_group",
             "needs >= 2 experts per group (a group's score is the sum of its top-2 scores)")
        need(self.topk_group <= self.n_group, "topk_group", f"must be <= n_group={self.n_group}")
        need(self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
             "num_experts_per_tok", "must be <= the experts in the topk_group selected groups")
        need(self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be <= num_hidden_layers={self.num_hidden_layers}")
        need(self.moe_layer_freq == 1, "moe_layer_freq", "only 1 (every layer after the dense ones is MoE)")
        need(self.scoring_func == "sigmoid", "scoring_func", "only 'sigmoid' (DeepSeek-V3 gating)")
        need(self.topk_method == "noaux_tc", "topk_method", "only 'noaux_tc' (group-limited top-k)")
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' (SwiGLU)")
        need(not self.tie_word_embeddings, "tie_word_embeddings", "DeepSeek-V3 has an untied head")
        need(not self.attention_bias, "attention_bias", "DeepSeek-V3 projections have no bias")
        self._check_rope_scaling(need)
        for alias, field in _HF_ALIASES.items():
            if self.extra.get(alias) is not None and self.extra[alias] != getattr(self, field):
                raise ValueError(f"ModelConfig.extra[{alias!r}]={self.extra[alias]!r}: transformers reads it as "
                                 f"{field}, which is {getattr(self, field)!r}; give {field} alone")
        if self.extra.get("rope_interleave", True) is not True:
            raise ValueError("ModelConfig.extra['rope_interleave']=False: DeepSeek-V3 checkpoints use "
                             "interleaved rotary pairs; only rope_interleave=True is supported")

    def _check_rope_scaling(self, need):
        """rope_scaling: None, or a dict naming a supported type whose every key the rope reads."""
        s = self.rope_scaling
        need(s is None or isinstance(s, dict), "rope_scaling", "must be a dict or null")
        if not s:
            return
        need("type" in s or "rope_type" in s, "rope_scaling", "names no 'rope_type' (or 'type')")
        need(s.get("type", self.rope_type) == self.rope_type, "rope_scaling", "'type' and 'rope_type' differ")
        need(self.rope_type in _ROPE_KEYS, "rope_scaling", f"unknown rope type; supported: {tuple(_ROPE_KEYS)}")
        need(s.get("rope_theta", self.rope_theta) == self.rope_theta, "rope_scaling",  # transformers 5 adds it
             f"its rope_theta differs from rope_theta={self.rope_theta}")
        keys = _ROPE_KEYS[self.rope_type]
        for k in sorted(s.keys() - {"type", "rope_type", "rope_theta"}):
            need(k in keys, "rope_scaling", f"{self.rope_type} rope does not use {k!r}; it reads {sorted(keys)}")
            need(keys[k][0](s[k]), "rope_scaling", f"{k} must be {keys[k][1]}")
        need(self.rope_type != "yarn" or "factor" in s, "rope_scaling", "yarn needs factor >= 1")

    # ---- derived values ----
    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (SPEC B; HF's rule)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn":
            m_all = self.rope_scaling.get("mscale_all_dim", 0)
            if m_all:
                scale *= yarn_mscale(self.rope_scaling["factor"], m_all) ** 2
        return scale

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- HF config.json ----
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict) -> ModelConfig:
        """Build from a HF config dict, a config.json path, or a directory holding one."""
        if isinstance(source, dict):
            src = copy.deepcopy(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                src = json.load(f)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "hf_keys"}
        kwargs: dict[str, Any] = {k: v for k, v in src.items() if k in names}
        kwargs = {**HF_ABSENT, **kwargs}
        if "rope_parameters" in src:  # transformers 5 writes rope_theta inside rope_parameters
            rp = dict(src["rope_parameters"] or {})
            kwargs["rope_theta"] = rp.pop("rope_theta", kwargs.get("rope_theta", 10000))
            kwargs["rope_scaling"] = rp if rp.get("rope_type", rp.get("type", "default")) != "default" else None
        extra = {k: v for k, v in src.items() if k not in names and k != "rope_parameters"}
        return cls(**kwargs, extra=extra, hf_keys=tuple(src))

    def to_hf(self) -> dict:
        """The HF config dict: the source's keys in its order, then any field changed from what
        an absent key means (a preset, having no source, writes every field)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("extra", "hf_keys")}
        if "rope_parameters" in self.hf_keys:
            values["rope_parameters"] = {**(self.rope_scaling or {"rope_type": "default"}),
                                         "rope_theta": self.rope_theta}
            for k in ("rope_scaling", "rope_theta"):
                if k not in self.hf_keys:
                    del values[k]
        values.update(self.extra)
        absent = {**{f.name: f.default for f in dataclasses.fields(self)}, **HF_ABSENT}
        out = {k: values[k] for k in self.hf_keys if k in values}
        out.update({k: v for k, v in values.items()
                    if k not in out and (not self.hf_keys or k not in absent or v != absent[k])})
        return copy.deepcopy(out)  # callers (transformers among them) edit what they are given

    def save_hf(self, directory: str | os.PathLike) -> None:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_hf(), f, indent=2)

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


# What transformers' DeepseekV3Config takes for a key config.json lacks, where that differs from
# our (the released model's) defaults: no rope scaling, 4096 positions.
HF_ABSENT = {"rope_scaling": None, "max_position_embeddings": 4096}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(factor: float, original: int) -> dict:
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


PRESETS: dict[str, ModelConfig] = {
    # The released model (SPEC A).
    "v3_671b": ModelConfig(),
    # Unit tests and HF parity: every feature on, seconds on a CPU.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
        num_nextn_predict_layers=1, max_position_embeddings=256, rope_scaling=_yarn(4.0, 64),
    ),
    # The default CPU training run: a few minutes on 2 cores.
    "small": ModelConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
        num_nextn_predict_layers=1, max_position_embeddings=1024, rope_scaling=None,
    ),
    # The GPU benchmark shape (PERF.md: 2.95B parameters, 0.68B active) plus one MTP module (3.18B);
    # tools/bench.py train leaves the MTP module out unless asked (--mtp-depth), as PERF.md and the HF peer do.
    "bench": ModelConfig(
        hidden_size=2048, intermediate_size=5632, moe_intermediate_size=512, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=768, kv_lora_rank=512,
        n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, first_k_dense_replace=1,
        num_nextn_predict_layers=1, max_position_embeddings=4096, rope_scaling=None,
    ),
}
