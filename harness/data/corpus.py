"""A prepared corpus, memory-mapped: reading a window touches only that window's pages."""

from __future__ import annotations

import json
import os

import numpy as np

from harness.data.prepare import INDEX, META


class TokenCorpus:
    """The token stream of a prepared corpus and the offsets where its documents start."""

    def __init__(self, path: str) -> None:
        with open(os.path.join(path, META)) as f:
            self.meta = json.load(f)
        self.path = path
        dtype = np.dtype(self.meta["dtype"])
        self.shards = [np.memmap(os.path.join(path, s["file"]), dtype=dtype, mode="r") for s in self.meta["shards"]]
        self.shard_starts = np.cumsum([0] + [s["tokens"] for s in self.meta["shards"]])
        self.document_starts = np.memmap(os.path.join(path, INDEX), dtype=np.int64, mode="r")
        self.vocab_size: int = self.meta["vocab_size"]

    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        assert 0 <= start and start + length <= len(self), (start, length, len(self))
        pieces = []
        shard = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        while length > 0:
            offset = start - int(self.shard_starts[shard])
            piece = self.shards[shard][offset:offset + length]
            pieces.append(piece)
            start, length = start + len(piece), length - len(piece)
            shard += 1
        return np.concatenate(pieces).astype(np.int64)

    def position_ids(self, start: int, length: int) -> np.ndarray:
        """Each token's position in its own document, for tokens [start, start + length)."""
        tokens = np.arange(start, start + length)
        document = np.searchsorted(self.document_starts, tokens, side="right") - 1
        return tokens - np.asarray(self.document_starts[document])
