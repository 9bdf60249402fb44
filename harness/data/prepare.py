"""Tokenize a source once into memory-mapped token shards plus a document index, cached by a
fingerprint of the sources and the tokenizer.

A prepared corpus is a folder `<cache_dir>/<fingerprint>/`:
  tokens_00000.bin ...  the token stream, documents back to back, in the smallest unsigned dtype
                        that holds the vocabulary (the layout of nanoGPT's .bin files)
  documents.idx         int64 offset of each document's first token (Megatron's .idx, reduced)
  meta.json             dtype, token / document / shard counts, vocabulary size, what it came from
It is written under a temporary name and renamed when complete, so a crash or a concurrent
prepare of the same fingerprint never leaves a half-written corpus that looks valid; the
temporaries of killed prepares are removed by the next prepare (harness/data/temporaries.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterable, Iterator

import numpy as np

from harness.data.invalid_utf8 import ReplacedSequences
from harness.data.sources import STDLIB, DataError, describe, documents, source_files
from harness.data.temporaries import remove_stale_temporaries, temporary_folder
from harness.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, token_dtype

FORMAT_VERSION = 1
META = "meta.json"
INDEX = "documents.idx"
SHARD_TOKENS = 1 << 28  # tokens per shard file: 256 MiB at uint8, 512 MiB at uint16
CHUNK_BYTES = 1 << 20  # text per task handed to a worker process
SMALL_SOURCE_BYTES = 16 << 20  # below this, tokenizing in this process beats starting workers

logger = logging.getLogger(__name__)


def fingerprint(source: str, tokenizer: str | None, text_field: str, max_bytes: int) -> str:
    """Changes when a source file (path, size, mtime), the tokenizer's files or the options do."""
    files = [(f, *_size_and_mtime(f)) for f in _all_files(source_files(source))]
    key = {"format": FORMAT_VERSION, "files": files, "tokenizer": _tokenizer_hash(tokenizer),
           "text_field": text_field if source != STDLIB else None, "max_bytes": max_bytes if source == STDLIB else None}
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]


def _all_files(entries: list[str]) -> list[str]:
    """Saved datasets are folders: their files count."""
    out = []
    for entry in entries:
        if os.path.isdir(entry):
            out += sorted(os.path.join(d, n) for d, _, names in os.walk(entry) for n in names)
        else:
            out.append(os.path.abspath(entry))
    return out


def _size_and_mtime(path: str) -> tuple[int, int]:
    try:
        stat = os.stat(path)
    except OSError as e:
        what = "a broken symbolic link" if os.path.islink(path) else "unreadable"
        raise DataError(f"{path}: {what} ({e.strerror}); fix or remove it") from None
    return stat.st_size, stat.st_mtime_ns


def _tokenizer_hash(path: str | None) -> str | None:
    if path is None:
        return None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            digest.update(name.encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def prepared_path(cache_dir: str, source: str, tokenizer: str | None, text_field: str, max_bytes: int) -> str:
    return os.path.join(cache_dir, fingerprint(source, tokenizer, text_field, max_bytes))


def is_prepared(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META))


def prepare_corpus(source: str, tokenizer: str | None, text_field: str, max_bytes: int, cache_dir: str,
            workers: int = 1, progress: bool = True) -> str:
    """The prepared corpus's folder; tokenizes only when no complete one has this fingerprint."""
    return prepare_into(prepared_path(cache_dir, source, tokenizer, text_field, max_bytes), source, tokenizer,
                        text_field, max_bytes, workers, progress)


def prepare_into(path: str, source: str, tokenizer: str | None, text_field: str, max_bytes: int, workers: int = 1,
                 progress: bool = True) -> str:
    """`path` (the source's `prepared_path`), tokenizing the source into it unless it is complete."""
    if is_prepared(path):
        return path
    cache_dir = os.path.dirname(path)
    partial = temporary_folder(path)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    except OSError as e:  # validation's os.access check cannot tell: root passes it even under /proc
        raise DataError(f"data.cache_dir={cache_dir}: cannot write there ({e.strerror}); choose a writable "
                        "folder") from None
    remove_stale_temporaries(cache_dir)
    try:
        total = max_bytes if source == STDLIB else sum(os.path.getsize(f) for f in _all_files(source_files(source)))
        # Bytes need no tokenizing work: reading the source in this process is the whole cost, and
        # workers would only add pickling (87 vs 12 MB/s measured, tests/bench/data_bench.py).
        workers = workers if total > SMALL_SOURCE_BYTES and tokenizer is not None else 1
        replaced = ReplacedSequences()
        meta = _write(partial, _chunks(documents(source, text_field, max_bytes, replaced)), tokenizer, workers,
                      _progress_bar(total, progress))
        if meta["tokens"] == 0:
            raise DataError(f"data.source={source}: no text in it; give files that hold text")
        meta.update(source=describe(source), tokenizer=tokenizer, text_field=text_field)
        with open(os.path.join(partial, META), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(partial, path)
        except OSError:
            if not is_prepared(path):  # another process finished the same corpus first: keep theirs
                raise
        if replaced.files:
            logger.warning(replaced.line())
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path


def _chunks(docs: Iterable[str | bytes]) -> Iterator[list[str | bytes]]:
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _write(folder: str, chunks: Iterator[list[str | bytes]], tokenizer_path: str | None, workers: int,
           bar) -> dict:
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    writer = _ShardWriter(folder, dtype)
    try:
        with open(os.path.join(folder, INDEX), "wb") as index:
            for encoded, text_bytes in _encode(chunks, tokenizer, tokenizer_path, workers):
                lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
                starts = writer.tokens + np.concatenate([[0], np.cumsum(lengths)[:-1]])
                index.write(starts.astype(np.int64).tobytes())
                writer.write(np.concatenate(encoded) if encoded else np.empty(0, dtype))
                bar.update(text_bytes)
    finally:
        bar.close()
        writer.close()
    return {"format": FORMAT_VERSION, "dtype": dtype.name, "tokens": writer.tokens,
            "documents": os.path.getsize(os.path.join(folder, INDEX)) // 8, "shards": writer.shards,
            "vocab_size": tokenizer.vocab_size}


def _encode(chunks: Iterator[list[str | bytes]], tokenizer: ByteTokenizer | HFTokenizer, tokenizer_path: str | None,
            workers: int) -> Iterator[tuple[list[np.ndarray], int]]:
    """(token arrays, text bytes) per chunk, in source order, from `workers` processes (1: this one)."""
    if workers <= 1:  # also for small sources: spawning workers (each imports torch) costs seconds
        for chunk in chunks:
            yield tokenizer.encode_documents(chunk), sum(len(d) for d in chunk)
        return
    # spawn, not fork: the caller may hold torch's thread pools, which do not survive a fork.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        yield from pool.imap(_encode_in_worker, chunks, chunksize=1)


_worker_tokenizer: ByteTokenizer | HFTokenizer | None = None


def _init_worker(tokenizer_path: str | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode_in_worker(chunk: list[str | bytes]) -> tuple[list[np.ndarray], int]:
    return _worker_tokenizer.encode_documents(chunk), sum(len(d) for d in chunk)


class _ShardWriter:
    """Appends tokens to fixed-size shard files."""

    def __init__(self, folder: str, dtype: np.dtype) -> None:
        self.folder, self.dtype = folder, dtype
        self.tokens = 0
        self.shards: list[dict] = []
        self.file = None

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self.file is None or self.shards[-1]["tokens"] == SHARD_TOKENS:
                self._next_shard()
            room = SHARD_TOKENS - self.shards[-1]["tokens"]
            piece, ids = ids[:room], ids[room:]
            self.file.write(piece.tobytes())
            self.shards[-1]["tokens"] += len(piece)
            self.tokens += len(piece)

    def _next_shard(self) -> None:
        if self.file is not None:
            self.file.close()
        name = f"tokens_{len(self.shards):05d}.bin"
        self.file = open(os.path.join(self.folder, name), "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
                disable=not (enabled and sys.stderr.isatty()), mininterval=1.0)
