"""A seeded permutation of [0, n) computed one index at a time, with no table of n entries.

A table (`torch.randperm(n)`) costs 8 bytes per window on every rank: 64 MB for 1 GB of
bytes at seq_len 128. A Feistel network over the next even power of two is a bijection; values
that land outside [0, n) are mapped again ("cycle walking") until they land inside, which keeps
it a bijection of [0, n). The domain is at most 4n, so a few rounds of walking suffice.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 4
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit affects every output bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (x ^ (x >> np.uint64(31))) & _MASK64


class Permutation:
    def __init__(self, n: int, seed: int) -> None:
        assert n > 0
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.low_mask = np.uint64((1 << self.half) - 1)
        with np.errstate(over="ignore"):
            self.keys = [_mix(np.uint64(seed) * np.uint64(ROUNDS) + np.uint64(r) + np.uint64(0x9E3779B97F4A7C15))
                         for r in range(ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.low_mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.low_mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """The images of `index` (values in [0, n)) under the permutation."""
        x = self._feistel(np.asarray(index, dtype=np.uint64))
        outside = x >= self.n
        while outside.any():
            x[outside] = self._feistel(x[outside])
            outside = x >= self.n
        return x.astype(np.int64)
