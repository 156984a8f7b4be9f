"""Byte-level BPE tokenizer: a user's tokenizer.json, or one trained on the corpus and cached."""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|end|>"
SPECIALS = ("<|begin|>", EOS, "<|pad|>")


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style byte alphabet, so any text encodes) with our special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer=trainer)
    return tok


def read_tokenizer(path: str) -> Tokenizer:
    """A tokenizer.json; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises its own exception types
        raise ValueError(f"{path} is not a tokenizers tokenizer.json: {e}") from e


def load_or_train_tokenizer(path: str | None, workdir: str, documents: Iterable[str] | None,
                            vocab_size: int) -> Tokenizer:
    """The workdir's tokenizer.json, which a run keeps for good: `path` if given (copied there
    on first use; a different one than a resumed run's is refused), else the cached one, else
    one trained on `documents` (and cached)."""
    cached = os.path.join(workdir, "tokenizer.json")
    if path:
        tok = read_tokenizer(path)
        if os.path.isfile(cached):
            if read_tokenizer(cached).to_str() != tok.to_str():
                raise ValueError(f"{path} differs from {cached}, the tokenizer this workdir was trained with; "
                                 "drop --tokenizer to continue, or use a new --workdir")
            return tok
    elif os.path.isfile(cached):
        return read_tokenizer(cached)
    else:
        tok = train_tokenizer(documents, vocab_size)
    tmp = cached + ".tmp"
    tok.save(tmp)
    os.replace(tmp, cached)
    return tok


def eos_id(tok: Tokenizer) -> int:
    """The end-of-document id: ours, DeepSeek's, or the tokenizer's last special token."""
    for name in (EOS, "<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise ValueError("tokenizer has no end-of-document token (looked for <|end|>, DeepSeek's "
                     "<｜end▁of▁sentence｜>, </s>, <|endoftext|>)")
