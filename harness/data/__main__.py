"""`python -m harness.data prepare --source S --tokenizer DIR --out DIR [--workers N]`: tokenize a
source into the shard cache that training reads (`data.cache_dir`); a rerun reuses it."""

from __future__ import annotations

import argparse
import sys
import time

from harness.data.corpus import TokenCorpus
from harness.data.prepare import prepare_corpus
from harness.data.sources import STDLIB, DataError

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenize a source into memory-mapped shards")
    p.add_argument("--source", default=STDLIB,
                   help="'stdlib', a .txt/.jsonl/.parquet file, a folder of them, or a save_to_disk folder")
    p.add_argument("--tokenizer", default=None, help="local HF tokenizer directory; default: bytes")
    p.add_argument("--out", default="runs/data", help="cache folder (data.cache_dir of the recipe)")
    p.add_argument("--text-field", default="text", help="the field / column holding the text")
    p.add_argument("--max-bytes", type=int, default=4_000_000, help="how much of the built-in corpus to read")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        path = prepare_corpus(args.source, args.tokenizer, args.text_field, args.max_bytes, args.out, args.workers)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    corpus = TokenCorpus(path)
    print(f"{path}: {len(corpus):,} tokens ({corpus.meta['dtype']}), {corpus.meta['documents']:,} documents, "
          f"{len(corpus.shards)} shard(s); {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
