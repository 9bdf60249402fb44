"""Data loading at scale: per-rank memory and start-up time against corpus size, the previous
path (every rank reads and tokenizes the whole corpus into an int64 tensor) against the prepared,
memory-mapped one; and prepare throughput with 1 and 2 tokenizer processes.

    python -m tests.bench.data_bench [--sizes-mb 10 100 1000] [--ranks 4] [--old-max-mb 100]

Corpora are .jsonl files of this Python's standard-library sources (one document per file,
repeated until the size is reached) under --work (default runs/bench/data). Each size runs on
--ranks real gloo ranks; a rank loads the corpus, then reads its share of 10 steps. "RSS" is the
rank's peak resident set (VmHWM), which includes the ~300 MB of torch itself; "start-up" is the
time from the process group to the first batch. The previous path is skipped above --old-max-mb:
its int64 tensor alone is 8 bytes per byte of text on every rank. Prepare throughput is measured
on the 100 MB corpus (or the largest below it) with bytes and with a BPE tokenizer (vocab 8,000)
trained on its first 5 MB. Writes runs/bench/data_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sysconfig
import time

import torch

from harness.config import load_config
from harness.data import load_tokens
from harness.data.prepare import prepare_corpus
from harness.data.sources import stdlib_files
from harness.data.splits import samplers
from tests.multiproc import run_ranks
from tests.bench.results import write_results

SEQ_LEN, GLOBAL_BATCH, STEPS = 128, 16, 10
MB = 1_000_000


def write_corpus(path: str, size: int) -> None:
    """`size` bytes of JSONL: the standard library's sources, one per line, repeated."""
    records = []
    for name in stdlib_files():
        with open(name, encoding="utf-8", errors="replace") as f:
            records.append(json.dumps({"text": f.read()}) + "\n")
    written = 0
    with open(path, "w") as f:
        while written < size:
            for record in records:
                f.write(record)
                written += len(record)
                if written >= size:
                    break


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the tokenizer workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _rss_peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _old_path(rank: int, world_size: int, source: str) -> dict:
    """The previous loader: the whole corpus as one int64 tensor on every rank, a randperm table."""
    started = time.perf_counter()
    with open(source, encoding="utf-8") as f:
        documents = [json.loads(line)["text"] for line in f if line.strip()]
    tokens = torch.frombuffer(bytearray(b"\0".join(d.encode() for d in documents)), dtype=torch.uint8).long()
    del documents
    windows = (len(tokens) - 1) // SEQ_LEN
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(0))
    share = GLOBAL_BATCH // world_size
    first = None
    for step in range(STEPS):
        ids = order[step * GLOBAL_BATCH + rank * share:step * GLOBAL_BATCH + (rank + 1) * share]
        batch = torch.stack([tokens[int(w) * SEQ_LEN:int(w) * SEQ_LEN + SEQ_LEN + 1] for w in ids])
        first = first or time.perf_counter() - started
    return {"startup_s": first, "rss_peak_mb": _rss_peak_mb(), "rows": int(batch.shape[0])}


def _new_path(rank: int, world_size: int, cfg) -> dict:
    started = time.perf_counter()
    sampler, _ = samplers(load_tokens(cfg.data), cfg)
    first = None
    for step in range(STEPS):
        inputs, _ = sampler.local_batch(step, rank, world_size)
        first = first or time.perf_counter() - started
    return {"startup_s": first, "rss_peak_mb": _rss_peak_mb(), "rows": int(inputs.shape[0])}


def _config(source: str, cache: str, tokenizer: str | None = None):
    return load_config(None, [f"--data.source={source}", f"--data.cache_dir={cache}", f"--train.seq_len={SEQ_LEN}",
                              f"--train.global_batch_size={GLOBAL_BATCH}"]
                       + ([f"--data.tokenizer={tokenizer}"] if tokenizer else []))


def bpe_tokenizer(source: str, folder: str, vocab: int = 8_000) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    with open(source) as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if sum(map(len, texts)) > 5 * MB:
                break
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--old-max-mb", type=int, default=100)
    parser.add_argument("--work", default="runs/bench/data")
    parser.add_argument("--out", default="runs/bench/data_bench.json")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    results: dict = {"machine": f"{os.cpu_count()} CPUs, {sysconfig.get_platform()}", "ranks": args.ranks,
                     "seq_len": SEQ_LEN, "global_batch": GLOBAL_BATCH, "sizes": [], "prepare": []}
    for size_mb in args.sizes_mb:
        source = os.path.join(args.work, f"corpus_{size_mb}mb.jsonl")
        if not os.path.isfile(source):
            write_corpus(source, size_mb * MB)
        cache = os.path.join(args.work, f"cache_{size_mb}mb")
        shutil.rmtree(cache, ignore_errors=True)
        started = time.perf_counter()
        prepare_corpus(source, None, "text", 0, cache, workers=2, progress=False)
        prepare_s = time.perf_counter() - started
        row = {"size_mb": size_mb, "prepare_s": prepare_s,
               "new": run_ranks(_new_path, args.ranks, _config(source, cache), timeout=1800)}
        if size_mb <= args.old_max_mb:
            row["old"] = run_ranks(_old_path, args.ranks, source, timeout=1800)
        results["sizes"].append(row)
        print(_size_line(row), flush=True)
    throughput_mb = max([s for s in args.sizes_mb if s <= 100], default=min(args.sizes_mb))
    source = os.path.join(args.work, f"corpus_{throughput_mb}mb.jsonl")
    tokenizer = bpe_tokenizer(source, os.path.join(args.work, "bpe"))
    # Bytes are always encoded in the preparing process (no worker has work to do).
    for name, path, worker_counts in (("bytes", None, (1,)), ("BPE 8k", tokenizer, (1, 2))):
        for workers in worker_counts:
            cache = os.path.join(args.work, "cache_throughput")
            shutil.rmtree(cache, ignore_errors=True)
            started, cpu_started = time.perf_counter(), _cpu_seconds()
            prepare_corpus(source, path, "text", 0, cache, workers=workers, progress=False)
            seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
            results["prepare"].append({"tokenizer": name, "workers": workers, "size_mb": throughput_mb,
                                       "seconds": seconds, "mb_per_s": throughput_mb / seconds, "cpu_s": cpu})
            print(f"prepare {throughput_mb} MB, {name}, {workers} worker(s): {throughput_mb / seconds:.1f} MB/s, "
                  f"{cpu:.1f} CPU s", flush=True)
    print_tables(results)
    write_results(args.out, results)


def _summary(ranks: list[dict]) -> tuple[float, float]:
    return max(r["rss_peak_mb"] for r in ranks), max(r["startup_s"] for r in ranks)


def _size_line(row: dict) -> str:
    rss, startup = _summary(row["new"])
    line = f"{row['size_mb']} MB: new rss {rss:.0f} MB, start-up {startup:.2f} s (prepare {row['prepare_s']:.1f} s)"
    if "old" in row:
        rss, startup = _summary(row["old"])
        line += f"; old rss {rss:.0f} MB, start-up {startup:.2f} s"
    return line


def print_tables(results: dict) -> None:
    print("\n| corpus | per-rank peak RSS, previous | per-rank peak RSS, prepared | start-up, previous | "
          "start-up, prepared | prepare (once, 2 workers) |")
    print("|---|---|---|---|---|---|")
    for row in results["sizes"]:
        new_rss, new_start = _summary(row["new"])
        old = (f"{_summary(row['old'])[0]:,.0f} MB", f"{_summary(row['old'])[1]:.2f} s") if "old" in row \
            else ("not run", "not run")
        print(f"| {row['size_mb']:,} MB | {old[0]} | {new_rss:,.0f} MB | {old[1]} | {new_start:.2f} s | "
              f"{row['prepare_s']:.1f} s |")
    print("\n| tokenizer | workers | prepare MB/s | CPU s per MB |")
    print("|---|---|---|---|")
    for row in results["prepare"]:
        print(f"| {row['tokenizer']} | {row['workers']} | {row['mb_per_s']:.1f} | {row['cpu_s'] / row['size_mb']:.2f} |")


if __name__ == "__main__":
    main()
