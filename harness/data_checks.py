"""Recipe checks of the data and eval sections, run by validation before any process starts."""

from __future__ import annotations

import os

from transformers import PretrainedConfig

from harness.config import Config, ConfigError
from harness.data import DataError, TokenCorpus, cached_path, prepare_data
from harness.data.sources import source_files
from harness.data.splits import check_splits
from harness.data.tokenizer import BYTE_VOCAB, load_tokenizer
from parallel.mesh import ParallelDims


def check_data_config(cfg: Config, model_config: PretrainedConfig, dims: ParallelDims) -> None:
    """Cheap checks: sources exist, the tokenizer fits the model, options fit the layout."""
    d, e = cfg.data, cfg.eval
    if d.workers is not None and d.workers < 1:
        raise ConfigError(f"data.workers={d.workers}: must be >= 1 (or null for the CPU count)")
    if e.every < 0 or e.steps <= 0:
        raise ConfigError(f"eval.every={e.every}, eval.steps={e.steps}: every must be >= 0 and steps > 0")
    if e.every and not 0 < e.held_out < 1:
        raise ConfigError(f"eval.held_out={e.held_out}: must be between 0 and 1 (e.g. 0.05) when eval.every > 0")
    if dims.pp > 1 and d.document_mask:
        raise ConfigError("data.document_mask: position ids are not carried through pipeline stages; "
                          "set parallel.pp=1 or data.document_mask=false")
    if dims.pp > 1 and e.every:
        raise ConfigError("eval.every: validation does not run under pipeline parallel yet; "
                          "set parallel.pp=1 or eval.every=0")
    if d.tokenizer is not None and not os.path.isdir(d.tokenizer):
        raise ConfigError(f"data.tokenizer={d.tokenizer}: no such directory; give a local HF tokenizer "
                          "directory, or leave it unset for bytes")
    try:
        source_files(d.source)
        vocab = BYTE_VOCAB if d.tokenizer is None else load_tokenizer(d.tokenizer).vocab_size
    except DataError as err:
        raise ConfigError(_data_line(err)) from None
    if vocab > model_config.vocab_size:
        what = "unset means bytes (256 ids)" if d.tokenizer is None else f"the tokenizer has {vocab:,} ids"
        raise ConfigError(f"data.tokenizer: {what} but the model's vocab_size is {model_config.vocab_size:,}; "
                          "use a matching tokenizer or raise model.overrides.vocab_size")


def check_corpus(cfg: Config) -> None:
    """Prepares the corpus (once: it is cached) and checks it holds a global batch for training
    and, when evaluation is on, eval.steps global batches held out. A torchrun worker only checks
    a corpus that is already cached: one process per node prepares it (the launcher, or local
    rank 0)."""
    try:
        path = cached_path(cfg.data) if "LOCAL_RANK" in os.environ else prepare_data(cfg.data)
    except DataError as err:
        raise ConfigError(_data_line(err)) from None
    if path is None:
        return
    try:
        check_splits(len(TokenCorpus(path)), cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _data_line(err: DataError) -> str:
    text = str(err)
    return text if text.startswith("data.") else f"data.source: {text}"


