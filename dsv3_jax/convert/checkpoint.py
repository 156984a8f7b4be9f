"""Orbax checkpoints of the model's params, and streaming HF <-> Orbax conversion.

Layout of a checkpoint directory:
    config.json   the model's HF config (`ModelConfig.save_hf`)
    tokenizer.json, tokenizer_config.json, generation_config.json: copied from the source when present
    params/       an Orbax (v1 API) pytree checkpoint of the nested pure param dict
                  ({"embed": {"embedding": [V, D]}, "moe_layers": {...}, ...}; see convert.names)

Streaming. A stacked leaf can be far larger than host RAM (671B: moe_layers/mlp/experts/gate_up_proj
is [58, 256, 7168, 2, 2048], 872 GB in bf16), so conversion never builds a leaf:
  1. Orbax saves the whole tree with zero-strided placeholders (`np.broadcast_to`, no memory; host
     arrays not deep-copied), chunked one source tensor per chunk (`shard_axes`: the stacked
     axes, and a fused leaf's part axis, `names.Leaf.chunk_axes`). This writes every leaf's
     metadata and zarr3 array in Orbax's own format, and almost no data.
  2. Each leaf's array is opened with tensorstore (zarr3 over the checkpoint's OCDBT database) and
     written one source tensor at a time, whole chunks at a time, at most `IN_FLIGHT` writes
     pending (one write per tensor: a single write of a large array would buffer it all).
     Orbax reads it back like any other checkpoint (it refuses missing chunks).
Export reads the same way, one chunk per HF tensor (`StoredLeaf`). Host memory stays near one
source tensor plus `IN_FLIGHT` pending writes, independent of the model (tests/convert/test_memory.py).
Rejected: handing Orbax a disk-backed `np.memmap` per leaf. Orbax writes a numpy leaf as one
tensorstore write, which buffers encoded chunks faster than they commit: anonymous memory grew
with the leaf (about 1/6 of a 2 GB leaf), and the staging file doubled the IO.
Every output directory is built under a temporary name next to its destination and renamed at
the end.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import os
import shutil
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
import tensorstore as ts
from flax import traverse_util

from dsv3_jax.config import ModelConfig
from dsv3_jax.convert.hf import HFSource, abstract_model, atomic_dir, build_model, flat_params
from dsv3_jax.convert.safetensors_io import CheckpointError
from dsv3_jax.model import DeepSeekV3

PARAMS = "params"
IN_FLIGHT = 4  # slice writes that may be pending at once (each holds its slice until committed)
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")  # copied from the source


def _ocdbt_root(params_dir: str) -> str:
    """The directory of the OCDBT database that holds a saved pytree's arrays."""
    roots = glob.glob(os.path.join(params_dir, "*", "manifest.ocdbt"))
    if len(roots) != 1:
        raise CheckpointError(f"{params_dir}: expected one Orbax OCDBT pytree, found {roots}")
    return os.path.dirname(roots[0])


def _open_leaf(root: str, path: str, shape: tuple[int, ...]) -> ts.TensorStore:
    """The zarr3 array Orbax stores for leaf `path` ('/'-joined; Orbax joins keys with '.')."""
    spec = {"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": "file://" + root,
                                           "path": path.replace("/", ".")}}
    try:
        store = ts.open(spec, open=True).result()
    except ValueError as e:
        raise CheckpointError(f"param {path}: no array in the checkpoint ({e})") from None
    if tuple(store.shape) != tuple(shape):
        raise CheckpointError(f"param {path} has shape {tuple(store.shape)}, the model needs {tuple(shape)}")
    return store


def _save_placeholders(params_dir: str, shapes: dict, chunk_axes: dict[str, tuple[int, ...]]) -> None:
    """Orbax-save every leaf as zeros that take no memory, chunked 1 wide along `chunk_axes[path]`."""
    tree = {p: np.broadcast_to(np.zeros((), s.dtype), s.shape) for p, s in shapes.items()}
    storage = ocp.options.ArrayOptions.Saving.StorageOptions

    def options(keypath, value):
        path = "/".join(str(k.key) for k in keypath)
        return storage(shard_axes=chunk_axes[path])

    ctx = ocp.Context()
    ctx.memory.deepcopy_host_arrays = False
    ctx.array.saving.scoped_storage_options_creator = options
    with ctx:
        ocp.save(params_dir, traverse_util.unflatten_dict(tree, sep="/"))


def convert_hf(src: str | os.PathLike, out_dir: str | os.PathLike, param_dtype=jnp.bfloat16,
               progress: Callable | None = None, *, layout: str | None = None, config=None) -> ModelConfig:
    """Stream a checkpoint (HF safetensors, DeepSeek's inference layout or PyTorch state dicts;
    `layout`/`config` as in `HFSource`) into an Orbax checkpoint at `out_dir`; returns the config.

    `param_dtype` is the stored dtype of every leaf except the router (always fp32).
    `progress(iterable, total)` wraps the leaf loop (e.g. tqdm).
    """
    source = HFSource(src, layout, config)
    _, _, shapes = abstract_model(source.config, param_dtype=param_dtype)
    leaves = source.checked_leaves(shapes)
    if progress is not None:
        leaves = progress(leaves, total=len(shapes))
    with atomic_dir(out_dir) as tmp:
        params = os.path.join(tmp, PARAMS)
        _save_placeholders(params, shapes, {leaf.param: leaf.chunk_axes(len(shapes[leaf.param].shape))
                                            for leaf in source.leaves})
        root = _ocdbt_root(params)
        for leaf in leaves:
            s = shapes[leaf.param]
            store = _open_leaf(root, leaf.param, s.shape)
            pending = collections.deque()
            try:
                for idx, x in source.slices(leaf, s.dtype):
                    if len(pending) == IN_FLIGHT:
                        pending.popleft().result()
                    pending.append(store[idx].write(x))
                while pending:
                    pending.popleft().result()
            finally:  # after an error or an interrupt, no write may land once the temporary directory is gone
                for future in pending:
                    with contextlib.suppress(Exception):
                        future.result()
        source.config.save_hf(tmp)
        src_dir = os.fspath(src) if os.path.isdir(src) else os.path.dirname(os.fspath(src))
        for name in CARRIED_FILES:  # what generation needs beside the weights (`inference.load_model`)
            if os.path.isfile(os.path.join(src_dir, name)):
                shutil.copyfile(os.path.join(src_dir, name), os.path.join(tmp, name))
    return source.config


class StoredLeaf:
    """One param leaf of a checkpoint on disk; `leaf[idx]` reads just that part (numpy)."""

    def __init__(self, store: ts.TensorStore):
        self.store = store
        self.shape = tuple(store.shape)
        self.dtype = np.dtype(store.dtype.numpy_dtype)

    def __getitem__(self, idx) -> np.ndarray:
        return self.store[idx].read().result()


def open_params(ckpt_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, StoredLeaf]]:
    """(config, flat {path: StoredLeaf}) of a checkpoint: nothing is read until indexed."""
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))  # tensorstore's file:// needs an absolute path
    config = ModelConfig.from_hf(ckpt_dir)
    root = _ocdbt_root(os.path.join(ckpt_dir, PARAMS))
    _, _, shapes = abstract_model(config)
    return config, {p: StoredLeaf(_open_leaf(root, p, s.shape)) for p, s in shapes.items()}


def save_checkpoint(config: ModelConfig, params, out_dir: str | os.PathLike) -> None:
    """Write config.json and params/ (params: a model, a nested pure dict or a flat dict)."""
    flat = {k: np.asarray(v) for k, v in flat_params(params).items()}
    with atomic_dir(out_dir) as tmp:
        ocp.save(os.path.join(tmp, PARAMS), traverse_util.unflatten_dict(flat, sep="/"))
        config.save_hf(tmp)


def load_checkpoint(ckpt_dir: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None
                    ) -> tuple[ModelConfig, DeepSeekV3]:
    """(config, model) from a checkpoint; leaves are cast to the model's dtypes and each device
    reads only its own slices from disk (sharded over `mesh`, default one device)."""
    config, leaves = open_params(ckpt_dir)
    return config, build_model(config, leaves, dtype, param_dtype, mesh)
