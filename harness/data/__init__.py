"""Data: sources tokenized once into memory-mapped shards (`python -m harness.data prepare`),
read by each rank one window at a time.

Modules: sources (documents from files, folders, saved datasets, the built-in corpus),
invalid_utf8 (what reading text replaced), tokenizer (bytes or a local HF tokenizer), prepare
(shards + document index, cached by fingerprint), temporaries (prepares' temporary folders),
corpus (the memory-mapped reader), order (a table-free seeded permutation), sampler (which
windows each step and rank read), splits (train / held-out windows).
"""

from __future__ import annotations

import json
import os

import torch.distributed as dist

from harness.config import DataConfig
from harness.data.corpus import TokenCorpus
from harness.data.prepare import is_prepared, prepare_into, prepared_path
from harness.data.sampler import BatchSampler, window_count
from harness.data.sources import DataError

__all__ = ["BatchSampler", "DataError", "TokenCorpus", "load_tokens", "prepare_data", "window_count"]

CORPUS_ENV = "HARNESS_DATA_CORPUS"  # {"data": where and with which options, "path": their prepared corpus's folder}


def corpus_path(cfg: DataConfig) -> str:
    """The prepared corpus's folder (complete or not). Its fingerprint stats every source file and
    hashes the tokenizer (0.3 s at 20,000 files), so the first process of a job to compute it
    records it in the environment, which the workers that the launcher starts inherit: it is
    computed once per job, not by every rank at validation, at preparing and at loading."""
    # The working folder too: the source and cache paths may be relative to it.
    data = [os.getcwd(), cfg.source, cfg.tokenizer, cfg.text_field, cfg.max_bytes, cfg.cache_dir]
    recorded = json.loads(os.environ.get(CORPUS_ENV, "{}"))
    if recorded.get("data") == data:
        return recorded["path"]
    path = prepared_path(cfg.cache_dir, cfg.source, cfg.tokenizer, cfg.text_field, cfg.max_bytes)
    os.environ[CORPUS_ENV] = json.dumps({"data": data, "path": path})
    return path


def prepare_data(cfg: DataConfig, progress: bool = True) -> str:
    """The prepared corpus's folder, tokenizing the source when its fingerprint is not cached."""
    return prepare_into(corpus_path(cfg), cfg.source, cfg.tokenizer, cfg.text_field, cfg.max_bytes,
                        workers=cfg.workers or min(8, os.cpu_count() or 1), progress=progress)


def cached_path(cfg: DataConfig) -> str | None:
    """The prepared corpus's folder when it is already cached, else None (nothing is tokenized)."""
    path = corpus_path(cfg)
    return path if is_prepared(path) else None


def load_tokens(cfg: DataConfig) -> TokenCorpus:
    """The corpus's token stream, memory-mapped. Under torch.distributed, local rank 0 of each
    node prepares it when it is not cached while the other ranks wait."""
    if dist.is_available() and dist.is_initialized():
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            prepare_data(cfg, progress=dist.get_rank() == 0)
        dist.barrier()
    return TokenCorpus(prepare_data(cfg, progress=False))
