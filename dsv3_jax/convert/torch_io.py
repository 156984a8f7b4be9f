"""Plain PyTorch state dicts (`torch.save` pickles), read like a safetensors checkpoint.

Files are opened with `torch.load(weights_only=True, mmap=True)`: the restricted unpickler builds
only tensors and plain containers (a pickle naming any other class or function is refused, never
executed), and mmap leaves tensor bytes on disk until one tensor is copied out (pages come in as
page cache, not process memory). Every file stays open (mapped) once its header pickle is parsed:
the loader reads leaf by leaf, visiting every shard for each leaf, and re-parsing a shard's pickle
per tensor would cost minutes on the released model. torch is imported lazily: only this layout
needs it.

Accepted: `pytorch_model.bin`, `pytorch_model-0000x-of-0000y.bin` with `pytorch_model.bin.index.json`,
or one `*.bin`/`*.pt`/`*.pth` file. A file's state dict is its top-level dict when every value
is a tensor; otherwise (a training checkpoint) the dict under its "state_dict" or "model" key, and
the other top-level entries (optimizer state, step counters) are ignored with a warning.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings

import ml_dtypes
import numpy as np

from dsv3_jax.convert.safetensors_io import CheckpointError, TensorIndex

INDEX = "pytorch_model.bin.index.json"
SINGLE = "pytorch_model.bin"
SUFFIXES = (".bin", ".pt", ".pth")
NESTED = ("state_dict", "model")  # keys a training checkpoint keeps its state dict under
_DTYPES = {
    "float64": np.dtype(np.float64), "float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16), "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "int64": np.dtype(np.int64), "int32": np.dtype(np.int32), "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
}


def _torch():
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        raise CheckpointError("install torch to read PyTorch pickles (pip install torch)") from None
    return torch


def load_state_dict(path: str, warn: bool = False) -> dict:
    """{name: torch tensor (mmapped)} of one pickle; anything but a plain state dict is refused."""
    torch = _torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: not a plain PyTorch state dict; refused to unpickle it "
                              f"(weights_only): {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch.save file ({e})") from None

    def plain(d) -> bool:
        return isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    if plain(obj):
        return obj
    nested = [k for k in NESTED if isinstance(obj, dict) and plain(obj.get(k))]
    if len(nested) != 1:
        raise CheckpointError(f"{path}: not a state dict (a dict of tensors, or one under "
                              f"{' or '.join(map(repr, NESTED))}); got {type(obj).__name__}"
                              + (f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else ""))
    ignored = sorted(map(str, set(obj) - set(nested)))
    if ignored and warn:
        warnings.warn(f"{path}: using the state dict under {nested[0]!r}; ignoring {ignored}", stacklevel=3)
    return obj[nested[0]]


def torch_files(src: str) -> tuple[list[str], dict[str, str] | None]:
    """(pickle paths, index weight map or None) of a PyTorch checkpoint file or directory."""
    if os.path.isfile(src):
        return [src], None
    index = os.path.join(src, INDEX)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a PyTorch checkpoint index ({e})") from None
        return [os.path.join(src, f) for f in sorted(set(weight_map.values()))], weight_map
    if os.path.exists(os.path.join(src, SINGLE)):
        return [os.path.join(src, SINGLE)], None
    found = sorted(f for f in os.listdir(src) if f.endswith(SUFFIXES))
    if len(found) != 1:
        raise CheckpointError(f"{src}: no {INDEX} or {SINGLE}, and {len(found)} *.bin/*.pt/*.pth files "
                              f"{found[:8]} (need exactly one)")
    return [os.path.join(src, found[0])], None


class TorchReader(TensorIndex):
    """The tensors of PyTorch pickles (the safetensors `Reader` interface), read from the mapped files."""

    def __init__(self, src: str | os.PathLike):
        files, weight_map = torch_files(os.fspath(src))
        self.entries: dict[str, tuple[str, tuple[int, ...], np.dtype]] = {}
        self.files: dict[str, dict] = {}  # path -> its state dict of mmapped tensors
        for path in files:
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: listed in {INDEX} but missing")
            self.files[path] = load_state_dict(path, warn=True)
            for name, t in self.files[path].items():
                if name in self.entries:
                    raise CheckpointError(f"tensor {name} is in both {self.entries[name][0]} and {path}")
                if weight_map is not None and os.path.join(os.fspath(src), weight_map.get(name, "")) != path:
                    raise CheckpointError(f"tensor {name} is in {path} but {INDEX} says {weight_map.get(name)}")
                dtype = _DTYPES.get(str(t.dtype).removeprefix("torch."))
                if dtype is None:
                    raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {t.dtype}")
                self.entries[name] = (path, tuple(t.shape), dtype)
        self._check_index(weight_map, INDEX)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name][2]

    def get(self, name: str) -> np.ndarray:
        """One tensor copied out of its (mmapped) file into a fresh numpy array."""
        path, shape, dtype = self.entries[name]
        t = self.files[path][name].detach().contiguous().reshape(-1)
        raw = t.view(_torch().uint8).numpy() if t.numel() else np.empty(0, np.uint8)
        return raw.view(dtype).reshape(shape).copy()
