"""HF checkpoints (safetensors, or any layout of `layouts.py`) <-> the model's pure param dict.

Loading streams: each param leaf is filled slice by slice from source tensors read one at a time
(block-FP8 weights are dequantized on the way), so a caller can consume and drop leaves one by
one. Every source tensor must be used and every shape is checked against the model's abstract
parameters; MTP layers (`model.layers.{L+k}.*`) are loaded and exported like any other layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from dsv3_jax.config import ModelConfig
from dsv3_jax.convert import fp8, layouts, names
from dsv3_jax.convert.safetensors_io import CheckpointError, Item, Reader, write_sharded
from dsv3_jax.model import DeepSeekV3

SCALE_SUFFIX = "_scale_inv"  # `x.weight` -> `x.weight_scale_inv`
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [fp8.BLOCK, fp8.BLOCK]}


def abstract_model(config: ModelConfig, dtype=jnp.float32, param_dtype=jnp.float32):
    """(graphdef, abstract state, flat {path: ShapeDtypeStruct}) of the model, nothing allocated."""
    abstract = nnx.eval_shape(
        lambda: DeepSeekV3(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    graphdef, state = nnx.split(abstract)
    return graphdef, state, traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/")


def build_model(config: ModelConfig, leaves: Mapping[str, Any] | Iterable[tuple[str, Any]], dtype=jnp.float32,
                param_dtype=jnp.float32, mesh=None) -> DeepSeekV3:
    """The model with parameters from {path: array} (or (path, array) pairs, consumed one at a
    time), cast to the model's dtypes and placed by the sharding rules over `mesh` (default: one
    device). Only the slices this process's devices own are read from each array (lazy leaves
    such as a checkpoint's `StoredLeaf` are read just there), so nothing gathers in one place."""
    from dsv3_jax import parallel  # noqa: PLC0415 (parallel imports the model, which imports this package)

    graphdef, state, shapes = abstract_model(config, dtype, param_dtype)
    shardings = parallel.flat_shardings(state, mesh or parallel.make_mesh(None, jax.devices()[:1]))
    placed = {}
    for path, array in leaves.items() if isinstance(leaves, Mapping) else leaves:
        if path not in shapes:
            raise CheckpointError(f"param {path} is not a parameter of the model")
        if tuple(array.shape) != shapes[path].shape:
            raise CheckpointError(f"param {path} has shape {tuple(array.shape)}, the model needs {shapes[path].shape}")
        placed[path] = parallel.place(array, shardings[path], shapes[path].dtype)
    if set(placed) != set(shapes):
        raise CheckpointError(f"params do not match the model: missing {sorted(set(shapes) - set(placed))}")
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(placed, sep="/"))
    return nnx.merge(graphdef, state)


def _layer_of(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _resolve_mtp(config: ModelConfig, present: set[str]) -> ModelConfig:
    """Drop MTP from the config when the checkpoint has none (HF `save_pretrained` writes none
    although config.json declares it); an MTP layer only partly present is an error."""
    n_layers, n_mtp = config.num_hidden_layers, config.num_nextn_predict_layers
    mtp_layers = {_layer_of(n) for n in present} - {None} - set(range(n_layers))
    if n_mtp and not mtp_layers:
        warnings.warn(f"config.json declares num_nextn_predict_layers={n_mtp} but the checkpoint has no "
                      f"MTP tensors (model.layers.{n_layers}.*, as written by HF transformers); "
                      "loading with num_nextn_predict_layers=0", stacklevel=3)
        return config.replace(num_nextn_predict_layers=0)
    absent = names.hf_names(config) - present
    for i in range(n_layers, n_layers + n_mtp):
        missing = sorted(n for n in absent if _layer_of(n) == i)
        if missing:
            raise CheckpointError(f"MTP layer model.layers.{i} is only partly present: missing "
                                  f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return config


def _check_names(config: ModelConfig, reader: Reader) -> None:
    """Every tensor the map needs is present, and every present tensor is needed."""
    present, needed = reader.names(), names.hf_names(config)
    missing = sorted(needed - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]}{more}")
    for name in sorted(present - needed):
        base = name[: -len(SCALE_SUFFIX)]
        if name.endswith(SCALE_SUFFIX) and base in needed and reader.dtype(base) == fp8.FP8:
            continue
        raise CheckpointError(f"unexpected tensor {name} (not part of a DeepSeek-V3 model with this config)")


def _check_tensor(reader: Reader, name: str, want: tuple[int, ...]) -> None:
    """From the headers alone: the tensor's shape is `want`, its dtype a float one, and a
    block-FP8 weight has a scale tensor of the matching shape."""
    if reader.shape(name) != want:
        raise CheckpointError(f"tensor {name} has shape {list(reader.shape(name))}, the config needs {list(want)}")
    dtype = reader.dtype(name)
    if dtype == fp8.FP8:
        scale = name + SCALE_SUFFIX
        if scale not in reader:
            raise CheckpointError(f"tensor {name} is float8_e4m3fn but {scale} is missing")
        if len(want) != 2 or reader.shape(scale) != fp8.scale_shape(want):
            need = list(fp8.scale_shape(want)) if len(want) == 2 else "none (only 2-d weights are block FP8)"
            raise CheckpointError(f"tensor {scale} has shape {list(reader.shape(scale))}; a weight of shape "
                                  f"{list(want)} needs {need}")
    elif not jnp.issubdtype(dtype, jnp.floating):  # bfloat16 included
        raise CheckpointError(f"tensor {name} has dtype {dtype}; weights must be floating point or float8_e4m3fn "
                              "with block scales")


def _read(reader: Reader, name: str) -> np.ndarray:
    """A source tensor (checked by `_check_tensor`); block-FP8 weights are dequantized to fp32."""
    if reader.dtype(name) != fp8.FP8:
        return reader.get(name)
    return fp8.dequantize(reader.get(name), reader.get(name + SCALE_SUFFIX))


class HFSource:
    """A checkpoint opened and checked against its config, ready to stream.

    `src` is a HF safetensors directory or another layout (`layouts.LAYOUTS`, detected unless
    `layout` is given); `config` defaults to the config.json beside the weights.
    """

    def __init__(self, src: str | os.PathLike, layout: str | None = None, config=None):
        self.reader, config = layouts.open_layout(src, layout, config)
        self.config = _resolve_mtp(config, self.reader.names())
        _check_names(self.config, self.reader)
        self.leaves = names.param_map(self.config)

    def check_copies(self) -> None:
        """The MTP layers' stored embedding/head must equal the shared ones (compared bitwise)."""
        for copy, main in names.mtp_copies(self.config):
            a, b = self.reader.get(copy), self.reader.get(main)
            if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
                raise CheckpointError(f"tensor {copy} must be a copy of {main} (the MTP layer shares them) "
                                      "but differs")

    def slices(self, leaf: names.Leaf, dtype) -> Iterator[tuple[tuple, np.ndarray]]:
        """(index into the param, its part in `dtype`) of one param leaf [*stack, *slice]: one
        per source tensor, read one at a time (`Leaf.tensors`; shapes checked by `checked_leaves`)."""
        for idx, name in leaf.tensors():
            src = _read(self.reader, name)
            yield idx, np.asarray(src.T if leaf.transpose else src, dtype)

    def checked_leaves(self, shapes: dict[str, jax.ShapeDtypeStruct]) -> list[names.Leaf]:
        """The name map's leaves, after checking that map and model agree, every tensor's shape
        and dtype (`_check_tensor`: before anything is read or written) and the MTP copies."""
        if {leaf.param for leaf in self.leaves} != set(shapes):
            raise RuntimeError("name map and model disagree: "
                               f"{sorted({leaf.param for leaf in self.leaves} ^ set(shapes))}")
        for leaf in self.leaves:
            for name in leaf.hf:
                _check_tensor(self.reader, name, leaf.hf_shape(shapes[leaf.param].shape))
        self.check_copies()
        return self.leaves

    def iter_params(self, shapes: dict[str, jax.ShapeDtypeStruct]) -> Iterator[tuple[str, np.ndarray]]:
        """(path, array) for every leaf, in map order, each in the dtype of `shapes[path]`."""
        for leaf in self.checked_leaves(shapes):
            out = np.empty(shapes[leaf.param].shape, shapes[leaf.param].dtype)
            for idx, x in self.slices(leaf, out.dtype):
                out[idx] = x
            yield leaf.param, out


def load_hf(src: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32, *, layout: str | None = None,
            config=None, mesh=None) -> tuple[ModelConfig, DeepSeekV3]:
    """(config, model) from a DeepSeek-V3 checkpoint (BF16/FP32 or block FP8, MTP included) in any
    layout of `layouts.py`; see `HFSource` for `layout` and `config`. Leaves are assembled on the
    host one at a time and placed straight into their shardings over `mesh`; for models whose
    stacked leaves do not fit host memory, `tools/convert_hf.py` then `load_checkpoint(mesh=)`."""
    source = HFSource(src, layout, config)
    _, _, shapes = abstract_model(source.config, dtype, param_dtype)
    return source.config, build_model(source.config, source.iter_params(shapes), dtype, param_dtype, mesh)


def _hf_config(config: ModelConfig, quantized: bool) -> dict:
    out = config.to_hf()
    out.setdefault("architectures", ["DeepseekV3ForCausalLM"])
    out.setdefault("model_type", "deepseek_v3")
    out.pop("quantization_config", None)
    if quantized:
        out["quantization_config"] = dict(QUANTIZATION_CONFIG)
    return out


def export_items(config: ModelConfig, leaves: Mapping[str, Any], quantize: bool = False) -> list[Item]:
    """Writer items for every HF tensor, ordered by layer. `leaves[path]` is a param leaf with a
    numpy `dtype` whose `[idx]` gives one HF tensor's part (`Leaf.tensors`); it is indexed only
    when that tensor is written."""
    items = []

    def add(name: str, leaf: names.Leaf, idx: tuple, shape, dtype):
        hf_shape = leaf.hf_shape(shape)

        def produce():
            x = np.asarray(leaves[leaf.param][idx])
            return [x.T if leaf.transpose else x]

        if quantize and names.is_fp8(leaf) and len(hf_shape) == 2:
            specs = [(name, fp8.FP8, hf_shape), (name + SCALE_SUFFIX, np.dtype(np.float32), fp8.scale_shape(hf_shape))]
            items.append((specs, lambda: list(fp8.quantize(produce()[0], name))))
        else:
            items.append(([(name, np.dtype(dtype), hf_shape)], produce))

    _, _, shapes = abstract_model(config)
    for leaf in names.param_map(config):
        for idx, name in leaf.tensors():
            add(name, leaf, idx, shapes[leaf.param].shape, leaves[leaf.param].dtype)
    top = {leaf.hf[0]: leaf for leaf in names.param_map(config) if not leaf.stack}
    for copy, main in names.mtp_copies(config):  # stored copies of the shared embedding / head
        leaf = top[main]
        add(copy, leaf, (), shapes[leaf.param].shape, leaves[leaf.param].dtype)

    def order(item):
        name = item[0][0][0]
        layer = _layer_of(name)
        return (-1 if name.startswith("model.embed") else 1 << 30) if layer is None else layer, name

    return sorted(items, key=order)


def save_hf(config: ModelConfig, params, hf_dir: str | os.PathLike, *, fp8_weights: bool = False,
            max_shard_size: int = 5 << 30) -> None:
    """Write a HF directory (config.json, safetensors shards, index) that transformers'
    `DeepseekV3ForCausalLM.from_pretrained` loads; MTP layers are written as `model.layers.{L+k}.*`.

    `params` is a model, a nested pure dict, or a flat {path: leaf} dict (arrays, or
    `checkpoint.StoredLeaf`s that are read slice by slice). With `fp8_weights`
    the projection weights are stored in the released 128x128 block-FP8 format (one holding inf or
    NaN is refused: its block would read back as NaN). The directory is
    written next to `hf_dir` under a temporary name and renamed at the end.
    """
    flat = {k: np.asarray(v) if isinstance(v, jax.Array) else v for k, v in flat_params(params).items()}
    items = export_items(config, flat, quantize=fp8_weights)
    with atomic_dir(hf_dir) as tmp:
        write_sharded(tmp, items, max_shard_size)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(_hf_config(config, fp8_weights), f, indent=2)


def flat_params(params) -> dict:
    """{path: array} from a model, a nested pure dict, or an already flat dict."""
    if isinstance(params, nnx.Module):
        params = nnx.to_pure_dict(nnx.state(params))
    if any(isinstance(v, dict) for v in params.values()):
        params = traverse_util.flatten_dict(params, sep="/")
    return dict(params)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """A temporary directory next to `path`, renamed to `path` on success and removed on error,
    so a failed or interrupted write never leaves a half-written output directory."""
    path = os.path.realpath(os.fspath(path))  # a symlink's target is what gets replaced
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path} exists and is not empty")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.isdir(path):
            os.rmdir(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
