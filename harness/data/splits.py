"""Training and held-out windows: the held-out split is the tail of the token stream."""

from __future__ import annotations

from harness.config import Config
from harness.data.corpus import TokenCorpus
from harness.data.sampler import BatchSampler, window_count


def split_windows(tokens: int, seq_len: int, held_out: float) -> tuple[range, range]:
    """(train, held-out) window ranges; held-out is empty when `held_out` is 0."""
    windows = window_count(tokens, seq_len)
    evaluated = int(windows * held_out)
    return range(0, windows - evaluated), range(windows - evaluated, windows)


def samplers(corpus: TokenCorpus, cfg: Config) -> tuple[BatchSampler, BatchSampler | None]:
    """The training sampler (shuffled) and, when evaluation is on, the held-out one (fixed order)."""
    t = cfg.train
    if cfg.eval.every == 0:
        return BatchSampler(corpus, t.seq_len, t.global_batch_size, t.seed), None
    train, held_out = split_windows(len(corpus), t.seq_len, cfg.eval.held_out)
    return (BatchSampler(corpus, t.seq_len, t.global_batch_size, t.seed, windows=train),
            BatchSampler(corpus, t.seq_len, t.global_batch_size, t.seed, windows=held_out, shuffle=False))
