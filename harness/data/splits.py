"""Training and held-out windows: the held-out split is the tail of the token stream."""

from __future__ import annotations

from harness.config import Config
from harness.data.corpus import TokenCorpus
from harness.data.sampler import BatchSampler, window_count


def split_windows(tokens: int, seq_len: int, held_out: float) -> tuple[range, range]:
    """(train, held-out) window ranges; held-out is empty when `held_out` is 0. Windows overlap by
    one token (the last label of one is the first input of the next), so the window between the
    splits is left out: no token is in both."""
    windows = window_count(tokens, seq_len)
    evaluated = int(windows * held_out)
    return range(0, windows - evaluated), range(windows - evaluated + 1, windows)


def check_splits(tokens: int, cfg: Config) -> None:
    """Raises ValueError, in one line, when a split holds less than the run reads from it: a global
    batch for training; eval.steps global batches held out (more would wrap around and weigh
    some windows twice)."""
    t, e = cfg.train, cfg.eval
    train, held_out = split_windows(tokens, t.seq_len, e.held_out if e.every else 0.0)
    for name, windows in (("training", train), ("held-out", held_out if e.every else None)):
        if windows is not None and len(windows) < t.global_batch_size:
            fix = "raise eval.held_out" if name == "held-out" else "use more data"
            raise ValueError(f"data.source={cfg.data.source}: {tokens:,} tokens give {len(windows)} {name} sequences "
                             f"of train.seq_len={t.seq_len}, fewer than one global batch of {t.global_batch_size}; "
                             f"{fix}, or lower seq_len or global_batch_size")
    needed = e.steps * t.global_batch_size
    if e.every and needed > len(held_out):
        raise ValueError(f"eval.steps={e.steps}: {e.steps} batches of train.global_batch_size={t.global_batch_size} "
                         f"need {needed} held-out sequences but the held-out split has {len(held_out)}; lower "
                         f"eval.steps to at most {len(held_out) // t.global_batch_size} or raise eval.held_out")


def samplers(corpus: TokenCorpus, cfg: Config) -> tuple[BatchSampler, BatchSampler | None]:
    """The training sampler (shuffled) and, when evaluation is on, the held-out one (fixed order).
    Checked again here: workers started by plain torchrun may prepare after their validation."""
    check_splits(len(corpus), cfg)
    t = cfg.train
    if cfg.eval.every == 0:
        return BatchSampler(corpus, t.seq_len, t.global_batch_size, t.seed), None
    train, held_out = split_windows(len(corpus), t.seq_len, cfg.eval.held_out)
    return (BatchSampler(corpus, t.seq_len, t.global_batch_size, t.seed, windows=train),
            BatchSampler(corpus, t.seq_len, t.global_batch_size, t.seed, windows=held_out, shuffle=False))
