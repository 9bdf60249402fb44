"""Token streams and the data-parallel batch sampler.

The built-in corpus is the running Python's own standard library sources, read as bytes
(no download). Local .txt / .jsonl files are tokenized with a local HF tokenizer, or as bytes.
The stream is cut into windows of seq_len+1 tokens, shuffled by the seed; step s uses global
samples [s*B, (s+1)*B) and data-parallel rank r takes its contiguous share, so ranks are
disjoint, every layout sees the same global batch, and resuming needs only the step.
"""

from __future__ import annotations

import json
import os
import sysconfig

import torch

from harness.config import DataConfig

BYTE_VOCAB = 256


def stdlib_bytes(max_bytes: int) -> bytes:
    """The standard library's .py files in a fixed order, joined by a NUL byte (a document break)."""
    chunks, size = [], 0
    for path in _stdlib_files(sysconfig.get_paths()["stdlib"]):
        with open(path, "rb") as f:
            chunk = f.read()
        chunks.append(chunk)
        size += len(chunk) + 1
        if size >= max_bytes:
            break
    return b"\0".join(chunks)[:max_bytes]


def _stdlib_files(root: str) -> list[str]:
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__")]
        files.extend(os.path.join(folder, n) for n in names if n.endswith(".py"))
    return sorted(files)


def _documents(path: str, text_field: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line)[text_field] for line in f if line.strip()]
        return [f.read()]


def load_tokens(cfg: DataConfig) -> torch.Tensor:
    """The whole corpus as one 1-D int64 tensor of token ids."""
    if cfg.source == "stdlib":
        return torch.frombuffer(bytearray(stdlib_bytes(cfg.max_bytes)), dtype=torch.uint8).long()
    documents = _documents(cfg.source, cfg.text_field)
    if cfg.tokenizer is None:
        return torch.frombuffer(bytearray(b"\0".join(d.encode() for d in documents)), dtype=torch.uint8).long()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True)
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer(document)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


class BatchSampler:
    """Global batch for a step, this rank's share of it, split into micro batches."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, global_batch_size: int, seed: int) -> None:
        windows = (len(tokens) - 1) // seq_len
        if windows < global_batch_size:
            raise ValueError(f"train.seq_len={seq_len}: the corpus has {len(tokens)} tokens, fewer than one "
                             f"global batch of {global_batch_size} sequences; use a shorter seq_len or more data")
        self.tokens, self.seq_len, self.global_batch_size, self.seed = tokens, seq_len, global_batch_size, seed
        self.windows = windows
        self._order: tuple[int, torch.Tensor] | None = None

    def _window_order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.windows, generator=generator))
        return self._order[1]

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of shape [global_batch_size, seq_len]; labels are inputs shifted by one."""
        rows = []
        for sample in range(step * self.global_batch_size, (step + 1) * self.global_batch_size):
            window = self._window_order(sample // self.windows)[sample % self.windows]
            start = int(window) * self.seq_len
            rows.append(self.tokens[start:start + self.seq_len + 1])
        batch = torch.stack(rows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def local_batch(self, step: int, dp_rank: int, dp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = self.global_batch(step)
        share = self.global_batch_size // dp_size
        rows = slice(dp_rank * share, (dp_rank + 1) * share)
        return inputs[rows], labels[rows]
