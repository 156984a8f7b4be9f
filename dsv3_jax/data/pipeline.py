"""The Grain input pipeline: documents -> shuffled per epoch -> tokens -> packed [B,T] batches;
held-out batches for evaluation packed the same way, from separate files, in file order.

Sources: plain text files (one document per file), JSONL (one document per line, a text field)
and pre-tokenized ArrayRecord files (each record a document's token ids as little-endian
int32). Documents are packed by concatenating and splitting at T (Grain's concat-then-split),
which yields segment ids (1, 2, ... per document in a row) and per-document positions. Each
process reads every process_count-th document, so hosts never read each other's share, and the
iterator's state is checkpointable with the model.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import grain
import grain.experimental
import numpy as np
from tokenizers import Tokenizer

from dsv3_jax.data.corpus import embedded_documents
from dsv3_jax.data.tokenizer import eos_id

TEXT_SUFFIXES = (".txt", ".md", ".text", ".py", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json")
ARRAY_RECORD_SUFFIXES = (".arrayrecord", ".array_record")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    paths: tuple[str, ...] = ()  # files or directories; empty = the embedded corpus
    text_field: str = "text"  # JSONL field holding the document
    seq_len: int = 256
    batch_size: int = 8  # global sequences per micro-batch, over all processes
    seed: int = 0
    val_paths: tuple[str, ...] = ()  # held-out files (same formats); empty = no evaluation
    val_batches: int = 8  # held-out batches per evaluation: the first ones of val_paths

    def __post_init__(self):
        for f in ("paths", "val_paths"):
            if isinstance(getattr(self, f), str):  # one path given bare (e.g. --set data.paths=FILE)
                object.__setattr__(self, f, (getattr(self, f),))
        if self.val_batches < 1:
            raise ValueError(f"DataConfig.val_batches={self.val_batches}: must be >= 1")
        if self.seq_len < 2:
            raise ValueError(f"DataConfig.seq_len={self.seq_len}: must be >= 2 (a token and its target)")
        if self.batch_size < 1:
            raise ValueError(f"DataConfig.batch_size={self.batch_size}: must be >= 1")


def _decode(path: str, raw: bytes) -> str:
    """UTF-8, less a leading byte-order mark (Windows editors write one; JSON refuses it)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def _files(paths: tuple[str, ...]) -> list[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs
                          if f.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES + ARRAY_RECORD_SUFFIXES))
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"data path not found: {p}")
    if not out:
        raise ValueError(f"no data files under {list(paths)}")
    kinds = {_kind(f) for f in out}
    if len(kinds) > 1:
        raise ValueError(f"mixed data kinds {sorted(kinds)} in {list(paths)}: use one kind per run")
    return out


def _kind(path: str) -> str:
    if path.endswith(ARRAY_RECORD_SUFFIXES):
        return "array_record"
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text"


def read_documents(paths: tuple[str, ...], text_field: str = "text") -> list[str]:
    """Text documents from text / JSONL files, with errors that name the file (and line)."""
    docs = []
    for path in _files(paths):
        with open(path, "rb") as f:
            raw = f.read()
        text = _decode(path, raw)
        if not text.strip():
            raise ValueError(f"{path}: empty file")
        if _kind(path) == "text":
            docs.append(text)
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{n}: no string field {text_field!r}")
            docs.append(record[text_field])
    return docs


class _Tokenize(grain.transforms.Map):
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.eos = tokenizer, eos_id(tokenizer)

    def map(self, doc: str) -> dict:
        return {"tokens": np.asarray(self.tokenizer.encode(doc).ids + [self.eos], np.int32)}


class _TokenRecord(grain.transforms.Map):
    def __init__(self, paths: tuple[str, ...]):
        self.paths = paths

    def map(self, record: bytes) -> dict:
        if len(record) % 4:
            raise ValueError(f"a record of {len(record)} bytes in {list(self.paths)}: records must be "
                             "token ids as little-endian int32 (4 bytes each)")
        return {"tokens": np.frombuffer(record, dtype="<i4").astype(np.int32)}


class _JsonSafeState(grain.DatasetIterator):
    """The packed iterator, restorable from a JSON checkpoint. Grain's packing marks "no partly
    used document" with the slice (-1, -1) and tests it with `!=`; JSON brings it back as
    [-1, -1], which read as a remainder and made a resumed stream differ from the uninterrupted
    one. The slices are made tuples again before Grain sees them."""

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(_tuple_slices(state))


def _tuple_slices(state):
    if not isinstance(state, dict):
        return state
    return {k: {f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _tuple_slices(v)
            for k, v in state.items()}


def _source(paths: tuple[str, ...], text_field: str, tokenizer: Tokenizer) -> grain.MapDataset:
    if paths and _kind(_files(paths)[0]) == "array_record":
        return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(_files(paths))), _TokenRecord(paths)
    docs = read_documents(paths, text_field) if paths else embedded_documents()
    return grain.MapDataset.source(docs), _Tokenize(tokenizer)


def _shared(paths, text_field, tokenizer, batch_size, process_index, process_count):
    """This process's share of the documents (every process_count-th) and their tokenizer map."""
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must divide over {process_count} processes")
    ds, to_tokens = _source(paths, text_field, tokenizer)
    if not len(ds):  # only ArrayRecord files can hold no documents: empty text files are refused
        raise ValueError(f"no documents in {list(paths)}")
    if len(ds) < process_count:
        raise ValueError(f"{len(ds)} documents cannot be shared by {process_count} processes")
    return ds[process_index::process_count], to_tokens


def _batches(docs: grain.MapDataset, config: DataConfig, process_count: int) -> grain.IterDataset:
    """Tokenized documents packed into rows of seq_len and batched, this process's rows each."""
    packed = grain.experimental.ConcatThenSplitIterDataset(docs.to_iter_dataset(),
                                                           length_struct={"tokens": config.seq_len})
    return packed.batch(config.batch_size // process_count, drop_remainder=True).map(
        lambda b: {"tokens": b["tokens"], "segment_ids": b["tokens_segment_ids"],
                   "positions": b["tokens_positions"]})


def make_iterator(config: DataConfig, tokenizer: Tokenizer, process_index: int = 0,
                  process_count: int = 1) -> grain.DatasetIterator:
    """An endless iterator of {"tokens", "segment_ids", "positions"}: int32 [B/processes, T]."""
    ds, to_tokens = _shared(config.paths, config.text_field, tokenizer, config.batch_size, process_index,
                            process_count)
    return _JsonSafeState(iter(_batches(ds.shuffle(seed=config.seed).repeat().map(to_tokens), config,
                                        process_count)))


def eval_batches(config: DataConfig, tokenizer: Tokenizer, process_index: int = 0,
                 process_count: int = 1) -> list[dict]:
    """The held-out batches every evaluation of a run scores: the first `val_batches` of
    `val_paths`, packed like training's batches from the documents in file order (one pass, no
    shuffle), this process's rows of each. Files too short for them are refused (every process
    must score as many batches)."""
    if not config.val_paths:
        raise ValueError("data.val_paths is empty: no held-out files to evaluate on")
    ds, to_tokens = _shared(config.val_paths, config.text_field, tokenizer, config.batch_size, process_index,
                            process_count)
    batches = list(itertools.islice(_batches(ds.map(to_tokens), config, process_count), config.val_batches))
    if len(batches) < config.val_batches:
        raise ValueError(f"data.val_paths {list(config.val_paths)} hold {len(batches)} batches of "
                         f"{config.batch_size} x {config.seq_len} tokens, fewer than data.val_batches="
                         f"{config.val_batches}; lower it or give more held-out text")
    return batches
