"""The PyTorch checkpoint layouts users hold, each opened as (tensor reader, config).

Every layout's reader presents the HF tensor names (the safetensors `Reader` interface: names,
shape, dtype, get), so one strict loader (`hf.HFSource`) serves them all:
  safetensors  a HF directory: model.safetensors, or shards + model.safetensors.index.json
  official     DeepSeek's inference layout, model{r}-mp{n}.safetensors (official.py)
  torch        PyTorch pickles: pytorch_model*.bin (+ index), or one *.bin/*.pt/*.pth (torch_io.py)
A directory holding both HF safetensors and pickles is read as safetensors (as transformers does).
"""

from __future__ import annotations

import json
import os
import warnings

from dsv3_jax.config import ModelConfig
from dsv3_jax.convert import official, safetensors_io, torch_io
from dsv3_jax.convert.safetensors_io import CheckpointError

LAYOUTS = ("safetensors", "official", "torch")
_EXPECTED = ("model.safetensors(.index.json) (HF safetensors), model{r}-mp{n}.safetensors (DeepSeek's "
             "inference layout), pytorch_model*.bin or one *.bin/*.pt/*.pth (PyTorch state dicts)")


def detect_layout(src: str | os.PathLike) -> str:
    """The layout of a checkpoint file or directory, from its file names."""
    src = os.fspath(src)
    if os.path.isfile(src):
        if src.endswith(torch_io.SUFFIXES):
            return "torch"
        raise CheckpointError(f"{src}: unknown checkpoint layout (a file, not a PyTorch pickle); expected "
                              f"a directory with {_EXPECTED}")
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: no such file or directory")
    files = os.listdir(src)
    if safetensors_io.INDEX in files or safetensors_io.SINGLE in files:
        return "safetensors"
    found = [layout for layout, present in (
        ("official", any(official.FILE.fullmatch(f) for f in files)),
        ("torch", torch_io.INDEX in files or any(f.endswith(torch_io.SUFFIXES) for f in files))) if present]
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError(f"{src}: holds both {' and '.join(found)} files; choose one with --layout")
    raise CheckpointError(f"{src}: unknown checkpoint layout; expected {_EXPECTED}; found "
                          f"{sorted(files)[:10]}")


def read_config(src: str | os.PathLike, config=None) -> ModelConfig:
    """The model config: `config` (a ModelConfig, a dict, or the path of a json, or of a directory
    with a config.json, holding a HF config or DeepSeek's ModelArgs), else the config.json beside
    the weights."""
    if isinstance(config, ModelConfig):
        return config
    if config is None:
        src = os.fspath(src)
        config = os.path.join(src if os.path.isdir(src) else os.path.dirname(src), "config.json")
        if not os.path.exists(config):
            raise CheckpointError(f"{config}: missing; pass the model config (--config): a HF config.json, or "
                                  "DeepSeek's ModelArgs json (inference/configs/config_671B.json)")
    where = "config"
    if not isinstance(config, dict):
        where = os.fspath(config)
        if os.path.isdir(where):
            where = os.path.join(where, "config.json")
        try:
            with open(where) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{where}: not a readable json config ({e})") from None
    if "hidden_size" in config:
        return ModelConfig.from_hf(config)
    if "dim" in config:
        return official.model_args_config(config)
    raise CheckpointError(f"{where}: neither a HF config.json (hidden_size, ...) nor DeepSeek's ModelArgs "
                          "json (dim, ...)")


def open_layout(src: str | os.PathLike, layout: str | None = None, config=None):
    """(reader with HF tensor names, config) of a checkpoint in any layout (detected if None)."""
    layout = layout or detect_layout(src)
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    config = read_config(src, config)
    if layout == "safetensors":
        return safetensors_io.Reader(src), config
    if layout == "torch":
        return torch_io.TorchReader(src), config
    warnings.warn("DeepSeek's inference layout has no MTP layer (its convert.py drops it); loading with "
                  "num_nextn_predict_layers=0", stacklevel=3)
    config = config.replace(num_nextn_predict_layers=0)
    return official.OfficialReader(src, config.n_routed_experts), config
