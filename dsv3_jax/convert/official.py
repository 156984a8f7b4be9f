"""DeepSeek's own inference layout (`inference/convert.py` output), read as a HF checkpoint.

`convert.py` renames every HF tensor (SPEC E) and splits it over `mp` model-parallel ranks into
`model{r}-mp{mp}.safetensors`: a tensor is narrowed into `mp` equal slices along its module's
shard dim, or copied whole to every rank (dim None); routed experts are not sliced, rank r holds
experts [r*E/mp, (r+1)*E/mp) whole; FP8 `scale` tensors are split like their weights. It drops
the MTP layer. `OfficialReader` undoes this: it presents the HF names and shapes, and reads a
full tensor by reassembling its slices (or checking its replicas are identical), one tensor at a
time. Configs come as HF config.json or as DeepSeek's `ModelArgs` json (`model_args_config`).
"""

from __future__ import annotations

import os
import re

import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.convert.safetensors_io import DTYPES, CheckpointError, read_header, read_tensor

# HF module name (the second-to-last name component) -> (official name, shard dim or None).
RENAME = {
    "embed_tokens": ("embed", 0),
    "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None),
    "q_proj": ("wq", 0),
    "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None),
    "q_b_proj": ("wq_b", 0),
    "kv_a_proj_with_mqa": ("wkv_a", None),
    "kv_a_layernorm": ("kv_norm", None),
    "kv_b_proj": ("wkv_b", 0),
    "o_proj": ("wo", 1),
    "gate": ("gate", None),
    "gate_proj": ("w1", 0),
    "down_proj": ("w2", 1),
    "up_proj": ("w3", 0),
    "norm": ("norm", None),
    "lm_head": ("head", 0),
}
_BACK = {off: hf for hf, (off, _) in RENAME.items()}
# Other components convert.py renames (HF -> official), applied before the table.
_PARTS = {"self_attn": "attn", "mlp": "ffn", "weight_scale_inv": "scale", "e_score_correction_bias": "bias"}
_PARTS_BACK = {off: hf for hf, off in _PARTS.items()}
FILE = re.compile(r"model(\d+)-mp(\d+)\.safetensors")
_EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(\d+)\.")


def official_name(hf: str) -> tuple[str, int | None]:
    """(official name, shard dim) that convert.py gives HF tensor `hf`."""
    parts = [_PARTS.get(p, p) for p in hf.removeprefix("model.").split(".")]
    parts[-2], dim = RENAME[parts[-2]]
    return ".".join(parts), dim


def hf_name(off: str) -> str | None:
    """The HF name convert.py renamed to `off`, or None when it writes no such name."""
    parts = [_PARTS_BACK.get(p, p) for p in off.split(".")]
    if len(parts) < 2 or parts[-2] not in _BACK:
        return None
    parts[-2] = _BACK[parts[-2]]
    name = ".".join(parts) if parts[0] == "lm_head" else "model." + ".".join(parts)
    return name if official_name(name)[0] == off else None


def rank_files(directory: str) -> list[str]:
    """The `model{r}-mp{mp}.safetensors` paths of a directory, by rank; all ranks must be there."""
    found = {}
    for f in sorted(os.listdir(directory)):
        m = FILE.fullmatch(f)
        if m:
            found[f] = (int(m.group(1)), int(m.group(2)))
    sizes = {mp for _, mp in found.values()}
    if len(sizes) != 1:
        raise CheckpointError(f"{directory}: " + (f"mixes model-parallel sizes {sorted(sizes)} in {sorted(found)}"
                                                  if sizes else "no model{r}-mp{n}.safetensors files"))
    (mp,) = sizes
    want = [f"model{r}-mp{mp}.safetensors" for r in range(mp)]
    for f in want:
        if f not in found:
            raise CheckpointError(f"{os.path.join(directory, f)}: missing (rank {want.index(f)} of mp={mp})")
    if len(found) != mp:
        raise CheckpointError(f"{directory}: unexpected files {sorted(set(found) - set(want))} for mp={mp}")
    return [os.path.join(directory, f) for f in want]


class OfficialReader:
    """The tensors of an official-layout directory under their HF names (the safetensors
    `Reader` interface), each read whole from its per-rank slices."""

    def __init__(self, directory: str | os.PathLike, n_routed_experts: int):
        paths = rank_files(os.fspath(directory))
        mp = len(paths)
        if n_routed_experts % mp:
            raise CheckpointError(f"{directory}: {n_routed_experts} routed experts cannot be split whole over "
                                  f"mp={mp} ranks")
        per_rank = n_routed_experts // mp
        found: dict[str, dict[int, tuple[str, dict, str]]] = {}  # hf name -> rank -> (path, entry, off)
        for rank, path in enumerate(paths):
            for off, entry in read_header(path).items():
                hf = hf_name(off)
                if hf is None:
                    raise CheckpointError(f"{path}: unexpected tensor {off} (not a name DeepSeek's convert.py writes)")
                found.setdefault(hf, {})[rank] = (path, entry, off)
        self.parts: dict[str, tuple[int | None, list[tuple[str, dict, str]]]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for hf, by_rank in found.items():
            m = _EXPERT.match(hf)
            if m:  # a routed expert: whole, on exactly its owner rank
                e = int(m.group(1))
                owner = e // per_rank
                (rank, (path, _, off)), *more = sorted(by_rank.items())
                if e >= n_routed_experts:
                    raise CheckpointError(f"{path}: unexpected tensor {off} (the config has "
                                          f"{n_routed_experts} routed experts)")
                if rank != owner or more:
                    raise CheckpointError(f"{path}: holds {off}, but routed expert {e} belongs on rank {owner} "
                                          f"alone ({per_rank} whole experts per rank)")
                dim = None
            else:
                dim = official_name(hf)[1]
                for rank, path in enumerate(paths):
                    if rank not in by_rank:
                        raise CheckpointError(f"{path}: missing {official_name(hf)[0]} (every rank holds "
                                              f"{'a slice' if dim is not None else 'a copy'} of it)")
            pieces = [by_rank[r] for r in sorted(by_rank)]
            path0, entry0, off = pieces[0]
            for path, entry, _ in pieces[1:]:
                if entry["shape"] != entry0["shape"] or entry["dtype"] != entry0["dtype"]:
                    raise CheckpointError(f"{path}: {off} is {entry['dtype']}{entry['shape']} but "
                                          f"{entry0['dtype']}{entry0['shape']} in {path0}")
            shape = list(entry0["shape"])
            if dim is not None:
                if dim >= len(shape):
                    raise CheckpointError(f"{path0}: {off} has shape {shape}, no dim {dim} to reassemble along")
                shape[dim] *= mp
            self.parts[hf] = (dim, pieces)
            self.shapes[hf] = tuple(shape)

    def names(self) -> set[str]:
        return set(self.parts)

    def __contains__(self, name: str) -> bool:
        return name in self.parts

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.parts[name][1][0][1]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """The full tensor: slices concatenated along the shard dim, or one checked replica."""
        dim, pieces = self.parts[name]
        if dim is not None:
            out = np.empty(self.shapes[name], self.dtype(name))
            step = out.shape[dim] // len(pieces)
            for r, (path, entry, off) in enumerate(pieces):
                index = [slice(None)] * out.ndim
                index[dim] = slice(r * step, (r + 1) * step)
                out[tuple(index)] = read_tensor(path, entry, off)
            return out
        (path0, entry0, off), *replicas = pieces
        out = read_tensor(path0, entry0, off)
        for path, entry, _ in replicas:
            if not np.array_equal(read_tensor(path, entry, off).view(np.uint8), out.view(np.uint8)):
                raise CheckpointError(f"{path}: {off} differs from its replica in {path0} (replicated on "
                                      "every rank, it must be identical)")
        return out


# DeepSeek's `ModelArgs` (inference/model.py) field -> its default; omitted fields take these.
MODEL_ARGS_DEFAULTS = {
    "max_batch_size": 8, "max_seq_len": 4096 * 4, "dtype": "bf16", "scale_fmt": None,
    "vocab_size": 102400, "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408, "n_layers": 27,
    "n_dense_layers": 1, "n_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
    "n_activated_experts": 6, "n_expert_groups": 1, "n_limited_groups": 1, "score_func": "softmax",
    "route_scale": 1.0, "q_lora_rank": 0, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "original_seq_len": 4096, "rope_theta": 10000.0,
    "rope_factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
}
# ModelArgs field -> ModelConfig (HF) field, where it is a plain copy (SPEC A).
MODEL_ARGS_FIELDS = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size", "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace", "n_heads": "num_attention_heads",
    "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok", "n_expert_groups": "n_group",
    "n_limited_groups": "topk_group", "route_scale": "routed_scaling_factor", "score_func": "scoring_func",
    "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim", "rope_theta": "rope_theta",
}


def model_args_config(args: dict) -> ModelConfig:
    """ModelConfig from DeepSeek's ModelArgs json (e.g. configs/config_671B.json).

    model.py's rules: q_lora_rank 0 means no query LoRA; top-k weights are renormalised for
    sigmoid scoring; YaRN (with `mscale` in the softmax scale) is on iff max_seq_len >
    original_seq_len; RMSNorm eps is 1e-6; there is no MTP layer.
    """
    unknown = sorted(set(args) - set(MODEL_ARGS_DEFAULTS))
    if unknown:
        raise CheckpointError(f"ModelArgs config: unknown fields {unknown}")
    a = {**MODEL_ARGS_DEFAULTS, **args}
    kw = {hf: a[off] for off, hf in MODEL_ARGS_FIELDS.items()}
    kw.update(num_key_value_heads=a["n_heads"], q_lora_rank=a["q_lora_rank"] or None,
              norm_topk_prob=a["score_func"] == "sigmoid", rms_norm_eps=1e-6, num_nextn_predict_layers=0,
              max_position_embeddings=a["max_seq_len"], rope_scaling=None)
    if a["max_seq_len"] > a["original_seq_len"]:
        kw["rope_scaling"] = {"type": "yarn", "factor": a["rope_factor"],
                              "original_max_position_embeddings": a["original_seq_len"],
                              "beta_fast": a["beta_fast"], "beta_slow": a["beta_slow"],
                              "mscale": a["mscale"], "mscale_all_dim": a["mscale"]}
        kw["max_position_embeddings"] = int(a["original_seq_len"] * a["rope_factor"])
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"ModelArgs config: {e}") from None
