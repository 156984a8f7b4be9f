"""Streaming safetensors reading and writing, one tensor at a time.

Reading parses and checks each file's header up front (a truncated or corrupt file, or a tensor
of a dtype not in DTYPES, is an error naming it) and then reads a single tensor's bytes on
request, so host memory holds one source tensor, not a shard. Writing computes the header from
the tensors' shapes first and then streams the bytes, so it never holds a shard either. numpy
dtypes come from ml_dtypes (bf16, e4m3).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_MAX_HEADER = 100 << 20


class CheckpointError(ValueError):
    """A checkpoint that does not match the config or the format (names the tensor/file)."""


class TensorIndex:
    """What both checkpoint readers share: `entries` by tensor name, each file's path first."""

    entries: dict[str, tuple]

    def _check_index(self, weight_map: dict | None, index: str) -> None:
        """Every tensor the index file `index` lists was found in some file."""
        for name, file in (weight_map or {}).items():
            if name not in self.entries:
                raise CheckpointError(f"tensor {name}: {index} lists it in {file}, which lacks it")

    def names(self) -> set[str]:
        return set(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries


class Reader(TensorIndex):
    """The tensors of a HF checkpoint directory (one file, or shards listed by the index)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        index = os.path.join(self.directory, INDEX)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(self.directory, SINGLE)):
            weight_map, files = None, [SINGLE]
        else:
            raise CheckpointError(f"{self.directory}: no {SINGLE} or {INDEX}")
        self.entries: dict[str, tuple[str, dict]] = {}  # name -> (file path, header entry)
        for file in files:
            path = os.path.join(self.directory, file)
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: listed in {INDEX} but missing")
            for name, entry in read_header(path).items():
                if name in self.entries:
                    raise CheckpointError(f"tensor {name} is in both {self.entries[name][0]} and {path}")
                if weight_map is not None and weight_map.get(name) != file:
                    raise CheckpointError(f"tensor {name} is in {path} but {INDEX} says "
                                          f"{weight_map.get(name)}")
                self.entries[name] = (path, entry)
        self._check_index(weight_map, INDEX)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.entries[name][1]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """Read one tensor from disk (a fresh array; nothing stays mapped)."""
        return read_tensor(*self.entries[name], name)


def read_tensor(path: str, entry: dict, name: str) -> np.ndarray:
    """The tensor a checked header `entry` of file `path` describes, read into a fresh array."""
    begin, end = entry["data_offsets"]
    out = np.empty(entry["shape"], DTYPES[entry["dtype"]])
    with open(path, "rb") as f:
        f.seek(entry["start"] + begin)
        if f.readinto(out.reshape(-1).view(np.uint8)) != end - begin:
            raise CheckpointError(f"{path}: tensor {name} is truncated")
    return out


def read_header(path: str) -> dict[str, dict]:
    """Parse and check a safetensors header: name -> {dtype, shape, data_offsets, start}."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (says {n} bytes, "
                                  f"file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size, covered = size - 8 - n, 0
    for name, e in header.items():
        ok = (isinstance(e, dict) and isinstance(e.get("dtype"), str) and isinstance(e.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in e["shape"])
              and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2)
        if not ok:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name}: {e}")
        if e["dtype"] not in DTYPES:  # a well-formed entry of a dtype we have no numpy type for
            raise CheckpointError(f"{path}: tensor {name} has dtype {e['dtype']}, which is not supported "
                                  f"(supported: {', '.join(DTYPES)})")
        begin, end = e["data_offsets"]
        nbytes = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path}: tensor {name} has data_offsets {e['data_offsets']} for "
                                  f"{nbytes} bytes")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated file: tensor {name} ends at byte {end} of a "
                                  f"{data_size}-byte data section")
        covered = max(covered, end)
        e["start"] = 8 + n
    if covered != data_size:
        raise CheckpointError(f"{path}: {data_size - covered} trailing bytes after the last tensor")
    return header


# One unit of writing: the (name, dtype, shape) of the tensors it makes, and a function making them.
Item = tuple[list[tuple[str, np.dtype, tuple[int, ...]]], Callable[[], list[np.ndarray]]]


def write_file(path: str, items: Iterable[Item], metadata: dict | None = None) -> None:
    """Write a safetensors file, producing each item's tensors only when its bytes are due."""
    items = list(items)
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for specs, _ in items:
        for name, dtype, shape in specs:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for specs, produce in items:
            tensors = produce()
            for (name, dtype, shape), t in zip(specs, tensors, strict=True):
                if t.dtype != dtype or t.shape != tuple(shape):
                    raise RuntimeError(f"{name}: produced {t.dtype}{t.shape}, declared {dtype}{shape}")
                f.write(np.ascontiguousarray(t).reshape(-1).view(np.uint8).data)


def write_sharded(directory: str, items: list[Item], max_shard_size: int) -> list[str]:
    """Write items into HF-named shards of at most `max_shard_size` bytes (an item is never
    split; a larger one gets a shard of its own), plus the index when there are several."""
    shards, size = [[]], 0
    for item in items:
        nbytes = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, d, s in item[0])
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    n = len(shards)
    files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for file, shard in zip(files, shards, strict=True):
        write_file(os.path.join(directory, file), shard, metadata={"format": "pt"})
        for specs, _ in shard:
            for name, dtype, shape in specs:
                weight_map[name] = file
                total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if n > 1:
        with open(os.path.join(directory, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files
