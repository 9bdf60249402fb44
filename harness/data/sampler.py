"""Which windows of the token stream each step and each data-parallel rank reads.

The stream is cut into windows of seq_len+1 tokens (stride seq_len); a seeded permutation per
epoch orders them. Step s uses global samples [s*B, (s+1)*B) and data-parallel rank r its
contiguous share, so ranks are disjoint, every layout sees the same global batch, resuming needs
only the step, and each epoch has its own order. A rank reads only its own windows.
"""

from __future__ import annotations

import numpy as np
import torch

from harness.data.corpus import TokenCorpus
from harness.data.order import Permutation


class BatchSampler:
    """Global batch for a step, this rank's share of it; `windows` restricts it to a split."""

    def __init__(self, corpus: TokenCorpus, seq_len: int, global_batch_size: int, seed: int,
                 windows: range | None = None, shuffle: bool = True) -> None:
        windows = range(window_count(len(corpus), seq_len)) if windows is None else windows
        if len(windows) < global_batch_size:
            raise ValueError(f"train.seq_len={seq_len}: the corpus has {len(windows)} windows of {seq_len + 1} "
                             f"tokens, fewer than one global batch of {global_batch_size} sequences; use a shorter "
                             "seq_len, a smaller global_batch_size or more data")
        self.corpus, self.seq_len, self.global_batch_size, self.seed = corpus, seq_len, global_batch_size, seed
        self.windows, self.shuffle = windows, shuffle
        self._order: tuple[int, Permutation] | None = None

    def _window_ids(self, samples: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(samples, len(self.windows))
        if not self.shuffle:
            return self.windows.start + offsets
        ids = np.empty_like(samples)
        for epoch in np.unique(epochs):
            if self._order is None or self._order[0] != epoch:
                self._order = (int(epoch), Permutation(len(self.windows), self.seed * 1_000_003 + int(epoch)))
            ids[epochs == epoch] = self._order[1](offsets[epochs == epoch])
        return self.windows.start + ids

    def _rows(self, step: int, first: int, count: int) -> np.ndarray:
        start = step * self.global_batch_size + first
        return self._window_ids(np.arange(start, start + count, dtype=np.int64)) * self.seq_len

    def _batch(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(np.stack([self.corpus.read(int(s), self.seq_len + 1) for s in starts]))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of shape [global_batch_size, seq_len]; labels are inputs shifted by one."""
        return self._batch(self._rows(step, 0, self.global_batch_size))

    def local_batch(self, step: int, dp_rank: int, dp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This data-parallel rank's rows of the global batch (only they are read)."""
        share = self.global_batch_size // dp_size
        return self._batch(self._rows(step, dp_rank * share, share))

    def position_ids(self, step: int, dp_rank: int = 0, dp_size: int = 1) -> torch.Tensor:
        """Positions of the inputs of `local_batch` (or `global_batch`) within their documents."""
        share = self.global_batch_size // dp_size
        starts = self._rows(step, dp_rank * share, share)
        return torch.from_numpy(np.stack([self.corpus.position_ids(int(s), self.seq_len) for s in starts]))


def window_count(tokens: int, seq_len: int) -> int:
    return max(0, (tokens - 1) // seq_len)
