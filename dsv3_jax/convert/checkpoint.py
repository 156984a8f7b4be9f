"""Orbax checkpoints of the model's params, and streaming HF -> Orbax conversion.

Layout of a checkpoint directory:
    config.json   the model's HF config (`ModelConfig.save_hf`)
    params/       an Orbax (v1 API) pytree checkpoint of the nested pure param dict
                  ({"embed": {"embedding": [V, D]}, "moe_layers": {...}, ...}; see convert.names)

Conversion writes `params/` one leaf at a time with Orbax's partial save, so peak host memory is
about one destination leaf plus one source tensor, not the model. Every output directory is
built under a temporary name next to its destination and renamed at the end.
"""

from __future__ import annotations

import os
from typing import Callable

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import traverse_util

from dsv3_jax.config import ModelConfig
from dsv3_jax.convert.hf import HFSource, abstract_model, atomic_dir, build_model, flat_params
from dsv3_jax.model import DeepSeekV3

PARAMS = "params"


def _leaf_tree(path: str, array: np.ndarray) -> dict:
    return traverse_util.unflatten_dict({path: array}, sep="/")


def convert_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, param_dtype=jnp.bfloat16,
               progress: Callable | None = None) -> ModelConfig:
    """Stream a HF checkpoint into an Orbax checkpoint at `out_dir`; returns the config.

    `param_dtype` is the stored dtype of every leaf except the router (always fp32).
    `progress(iterable, total)` wraps the leaf loop (e.g. tqdm).
    """
    source = HFSource(hf_dir)
    _, _, shapes = abstract_model(source.config, param_dtype=param_dtype)
    leaves = source.iter_params(shapes)
    if progress is not None:
        leaves = progress(leaves, total=len(shapes))
    with atomic_dir(out_dir) as tmp:
        params = os.path.join(tmp, PARAMS)
        for path, array in leaves:
            ocp.partial.save(params, _leaf_tree(path, array))
            del array
        ocp.partial.finalize(params)
        source.config.save_hf(tmp)
    return source.config


def save_checkpoint(config: ModelConfig, params, out_dir: str | os.PathLike) -> None:
    """Write config.json and params/ (params: a model, a nested pure dict or a flat dict)."""
    flat = {k: np.asarray(v) for k, v in flat_params(params).items()}
    with atomic_dir(out_dir) as tmp:
        ocp.save(os.path.join(tmp, PARAMS), traverse_util.unflatten_dict(flat, sep="/"))
        config.save_hf(tmp)


def load_params(ckpt_dir: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(config, flat {path: numpy array}) of a checkpoint, as stored."""
    config = ModelConfig.from_hf(os.fspath(ckpt_dir))
    tree = ocp.load(os.path.join(os.fspath(ckpt_dir), PARAMS))
    return config, traverse_util.flatten_dict(tree, sep="/")


def load_checkpoint(ckpt_dir: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32
                    ) -> tuple[ModelConfig, DeepSeekV3]:
    """(config, model) from a checkpoint; leaves are cast to the model's dtypes."""
    config, flat = load_params(ckpt_dir)
    return config, build_model(config, flat, dtype, param_dtype)
