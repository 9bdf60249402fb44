"""Documents to token ids: bytes (vocab 256, documents end with a NUL byte) or a local HF
tokenizer (documents end with its EOS token when it has one)."""

from __future__ import annotations

import os

import numpy as np

from harness.data.sources import DataError, error_line

BYTE_VOCAB = 256


class ByteTokenizer:
    """UTF-8 bytes as ids; NUL ends a document."""

    vocab_size = BYTE_VOCAB

    def encode_documents(self, documents: list[str | bytes]) -> list[np.ndarray]:
        return [np.frombuffer((d if isinstance(d, bytes) else d.encode()) + b"\0", dtype=np.uint8)
                for d in documents]


class HFTokenizer:
    """A local Hugging Face tokenizer, never the network."""

    def __init__(self, path: str) -> None:
        # Worker processes already run in parallel; the Rust pool inside each would oversubscribe.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self.tokenizer)
        self.eos = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]

    def encode_documents(self, documents: list[str | bytes]) -> list[np.ndarray]:
        texts = [d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d for d in documents]
        ids = self.tokenizer(texts)["input_ids"]
        return [np.asarray(row + self.eos, dtype=np.int64) for row in ids]


def load_tokenizer(path: str | None) -> ByteTokenizer | HFTokenizer:
    if path is None:
        return ByteTokenizer()
    try:
        return HFTokenizer(path)
    except Exception as e:  # the loader is the check of the files: damaged ones raise KeyError, TypeError, ...
        raise DataError(f"data.tokenizer={path}: cannot load it ({error_line(e)}); give a folder written by a "
                        "tokenizer's save_pretrained, or leave it unset for bytes") from None


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} ids does not fit in uint32")
