"""The HF <-> param name map, as data.

Each `Rule` says where one param leaf comes from inside a HF decoder layer (or at top level) and
how the tensor is laid out. `param_map(config)` expands the rules into `Leaf`s: the full param
path plus the HF tensor names that fill it, in the order of the leaf's stacked leading axes
([L] for layer groups, [L, E] for routed experts). A slice of the stacked axes is one HF tensor,
or for a fused leaf (the routed experts' gate_up_proj [L, E, D, 2, F]) several, tensor j filling
[..., j, :] of it. Shapes are not stated here: they come from the model's abstract parameters
(HF shape = per-tensor param shape, reversed for linear weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from dsv3_jax.config import ModelConfig

# How a HF tensor becomes a param slice.
LINEAR = "linear"  # HF Linear [out, in] -> [in, out]; stored block-FP8 in the released format
ROUTER = "router"  # HF Linear [out, in] -> [in, out]; never FP8 (router gate, eh_proj)
COPY = "copy"  # same layout (norm scales, embedding, correction bias)


@dataclasses.dataclass(frozen=True)
class Rule:
    param: str  # path below the group prefix, e.g. "attn/q_a_proj/kernel"
    hf: str | tuple[str, ...]  # name below the HF layer prefix ("{e}": a routed-expert index); several: fused
    kind: str
    when: Callable[[ModelConfig], bool] = lambda c: True


@dataclasses.dataclass(frozen=True)
class Leaf:
    param: str  # full param path, '/'-joined
    hf: tuple[str, ...]  # HF names, row-major over the leaf's stacked axes, then its parts
    stack: tuple[int, ...]  # the stacked leading axes: () top level, (L,) layers, (L, E) experts
    kind: str
    parts: int = 1  # HF tensors per slice of the stacked axes; > 1: tensor j fills [..., j, :]

    @property
    def transpose(self) -> bool:
        return self.kind in (LINEAR, ROUTER)

    def tensors(self) -> Iterator[tuple[tuple, str]]:
        """(index into the param, HF name) of each HF tensor, in `hf` order: a slice of the
        stacked axes, or for a fused leaf the part [..., j, :] of one."""
        if self.parts == 1:
            return zip(np.ndindex(*self.stack), self.hf, strict=True)
        return ((i[:-1] + (Ellipsis, i[-1], slice(None)), name)
                for i, name in zip(np.ndindex(*self.stack, self.parts), self.hf, strict=True))

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of each of this leaf's HF tensors, for a param of `shape`."""
        per = tuple(shape[len(self.stack):])
        if self.parts > 1:
            per = per[:-2] + per[-1:]  # [..., parts, n] -> [..., n]
        return per[::-1] if self.transpose else per

    def chunk_axes(self, ndim: int) -> tuple[int, ...]:
        """The axes of the param (`ndim` of them) along which one HF tensor covers one index:
        storage chunked 1 wide along them holds one tensor per chunk."""
        return tuple(range(len(self.stack))) + ((ndim - 2,) if self.parts > 1 else ())


def _q_lora(c: ModelConfig) -> bool:
    return c.q_lora_rank is not None


ATTENTION = (
    Rule("attn_norm/scale", "input_layernorm.weight", COPY),
    Rule("mlp_norm/scale", "post_attention_layernorm.weight", COPY),
    Rule("attn/q_proj/kernel", "self_attn.q_proj.weight", LINEAR, lambda c: not _q_lora(c)),
    Rule("attn/q_a_proj/kernel", "self_attn.q_a_proj.weight", LINEAR, _q_lora),
    Rule("attn/q_a_norm/scale", "self_attn.q_a_layernorm.weight", COPY, _q_lora),
    Rule("attn/q_b_proj/kernel", "self_attn.q_b_proj.weight", LINEAR, _q_lora),
    Rule("attn/kv_a_proj/kernel", "self_attn.kv_a_proj_with_mqa.weight", LINEAR),
    Rule("attn/kv_a_norm/scale", "self_attn.kv_a_layernorm.weight", COPY),
    Rule("attn/kv_b_proj/kernel", "self_attn.kv_b_proj.weight", LINEAR),
    Rule("attn/o_proj/kernel", "self_attn.o_proj.weight", LINEAR),
)

DENSE_MLP = (
    Rule("mlp/gate_proj/kernel", "mlp.gate_proj.weight", LINEAR),
    Rule("mlp/up_proj/kernel", "mlp.up_proj.weight", LINEAR),
    Rule("mlp/down_proj/kernel", "mlp.down_proj.weight", LINEAR),
)


def _shared(c: ModelConfig) -> bool:
    return c.n_shared_experts > 0


MOE_MLP = (
    Rule("mlp/router/kernel", "mlp.gate.weight", ROUTER),
    Rule("mlp/router/bias", "mlp.gate.e_score_correction_bias", COPY),
    Rule("mlp/experts/gate_up_proj", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), LINEAR),
    Rule("mlp/experts/down_proj", "mlp.experts.{e}.down_proj.weight", LINEAR),
    Rule("mlp/shared/gate_proj/kernel", "mlp.shared_experts.gate_proj.weight", LINEAR, _shared),
    Rule("mlp/shared/up_proj/kernel", "mlp.shared_experts.up_proj.weight", LINEAR, _shared),
    Rule("mlp/shared/down_proj/kernel", "mlp.shared_experts.down_proj.weight", LINEAR, _shared),
)

# MTP-only tensors of `model.layers.{L+k}.`; its decoder layer is ATTENTION + MOE_MLP under "layer/".
MTP_EXTRA = (
    Rule("enorm/scale", "enorm.weight", COPY),
    Rule("hnorm/scale", "hnorm.weight", COPY),
    Rule("eh_proj/kernel", "eh_proj.weight", ROUTER),
    Rule("head_norm/scale", "shared_head.norm.weight", COPY),
)

TOP = (
    Rule("embed/embedding", "model.embed_tokens.weight", COPY),
    Rule("final_norm/scale", "model.norm.weight", COPY),
    Rule("lm_head/kernel", "lm_head.weight", LINEAR),
)

# Tensors of `model.layers.{L+k}.` that are stored copies of a shared top-level tensor.
MTP_COPIES = (
    ("embed_tokens.weight", "model.embed_tokens.weight"),
    ("shared_head.head.weight", "lm_head.weight"),
)

# LINEAR weights that stay high precision in the released FP8 format (SPEC E).
NOT_FP8 = ("embed/embedding", "lm_head/kernel")


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def _group(prefix: str, rules, layers: range, config: ModelConfig) -> list[Leaf]:
    leaves = []
    for r in rules:
        if not r.when(config):
            continue
        parts = (r.hf,) if isinstance(r.hf, str) else r.hf
        if "{e}" in parts[0]:
            experts = range(config.n_routed_experts)
            names = tuple(layer_prefix(i) + p.format(e=e) for i in layers for e in experts for p in parts)
            stack = (len(layers), len(experts))
        else:
            names = tuple(layer_prefix(i) + p for i in layers for p in parts)
            stack = (len(layers),)
        leaves.append(Leaf(prefix + r.param, names, stack, r.kind, len(parts)))
    return leaves


def param_map(config: ModelConfig) -> list[Leaf]:
    """Every param leaf of `config`'s model with the HF tensors that fill it."""
    leaves = [Leaf(r.param, (r.hf,), (), r.kind) for r in TOP]
    n_dense, n_layers = config.num_dense_layers, config.num_hidden_layers
    n_mtp = config.num_nextn_predict_layers
    groups = (
        ("dense_layers/", ATTENTION + DENSE_MLP, range(0, n_dense)),
        ("moe_layers/", ATTENTION + MOE_MLP, range(n_dense, n_layers)),
        ("mtp/layer/", ATTENTION + MOE_MLP, range(n_layers, n_layers + n_mtp)),
        ("mtp/", MTP_EXTRA, range(n_layers, n_layers + n_mtp)),
    )
    for prefix, rules, layers in groups:
        if len(layers):
            leaves += _group(prefix, rules, layers, config)
    return leaves


def mtp_copies(config: ModelConfig) -> list[tuple[str, str]]:
    """(MTP-layer tensor, the shared tensor it must equal) for every MTP layer."""
    n = config.num_hidden_layers
    return [(layer_prefix(n + k) + name, main)
            for k in range(config.num_nextn_predict_layers) for name, main in MTP_COPIES]


def hf_names(config: ModelConfig) -> set[str]:
    """Every HF tensor name a checkpoint of `config` holds (FP8 scales aside)."""
    out = {copy for copy, _ in mtp_copies(config)}
    for leaf in param_map(config):
        out.update(leaf.hf)
    return out


def is_fp8(leaf: Leaf) -> bool:
    """Whether the released format stores this leaf's tensors as block FP8."""
    return leaf.kind == LINEAR and leaf.param not in NOT_FP8
