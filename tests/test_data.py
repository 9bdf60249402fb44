"""Prepared corpora: shards, document index, dtype, cache, sources; the sampler; data errors."""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import harness.data.prepare as prepare_module
from harness.config import ConfigError
from harness.data import BatchSampler, TokenCorpus, load_tokens
from harness.data.prepare import fingerprint, prepare_corpus
from harness.data.sources import DataError, stdlib_files
from harness.data.splits import split_windows
from harness.data.tokenizer import token_dtype
from harness.data_checks import check_corpus
from harness.validation import validate
from tests.data_helpers import corpus_folder, data_recipe, word_tokenizer, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_folder_of_txt_jsonl_parquet_prepares_once_into_uint8_shards(tmp_path):
    folder = corpus_folder(str(tmp_path), documents=3)
    path = prepare_corpus(folder, None, "text", 0, str(tmp_path / "cache"), workers=1, progress=False)
    corpus = TokenCorpus(path)
    texts = ["plain text document\n", *[f"json document {i} " * 5 for i in range(3)],
             *[f"parquet row {i} " * 5 for i in range(3)]]
    expected = b"".join(t.encode() + b"\0" for t in texts)
    assert corpus.meta["dtype"] == "uint8"
    assert corpus.read(0, len(corpus)).tobytes() == np.frombuffer(expected, np.uint8).astype(np.int64).tobytes()
    lengths = [len(t) + 1 for t in texts]
    assert corpus.document_starts.tolist() == np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    # Positions restart at each document start.
    positions = corpus.position_ids(0, len(corpus))
    assert positions[lengths[0]] == 0 and positions[lengths[0] - 1] == lengths[0] - 1

    written = os.path.getmtime(os.path.join(path, "meta.json"))
    assert prepare_corpus(folder, None, "text", 0, str(tmp_path / "cache"), workers=1, progress=False) == path
    assert os.path.getmtime(os.path.join(path, "meta.json")) == written  # reused, not rewritten
    with open(os.path.join(folder, "a.txt"), "a") as f:
        f.write("more\n")
    assert prepare_corpus(folder, None, "text", 0, str(tmp_path / "cache"), workers=1, progress=False) != path


def test_worker_processes_and_shard_boundaries_do_not_change_the_stream(tmp_path, monkeypatch):
    tokenizer = word_tokenizer(str(tmp_path / "tok"), words=50)
    source = write_jsonl(str(tmp_path / "d.jsonl"), [" ".join(f"w{j % 50}" for j in range(i + 1)) for i in range(200)])
    one = TokenCorpus(prepare_corpus(source, tokenizer, "text", 0, str(tmp_path / "one"), workers=1, progress=False))
    monkeypatch.setattr(prepare_module, "SMALL_SOURCE_BYTES", 0)  # start workers even for this tiny source
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 2_000)
    monkeypatch.setattr(prepare_module, "SHARD_TOKENS", 5_000)
    children_cpu = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    two = TokenCorpus(prepare_corpus(source, tokenizer, "text", 0, str(tmp_path / "two"), workers=2, progress=False))
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime > children_cpu  # worker processes ran
    assert len(two.shards) > 2
    assert np.array_equal(one.read(0, len(one)), two.read(0, len(two)))
    assert np.array_equal(one.document_starts, two.document_starts)
    # A window across a shard boundary reads the same tokens.
    assert np.array_equal(one.read(4_990, 20), two.read(4_990, 20))


def test_tokenizer_vocabulary_picks_the_dtype(tmp_path):
    assert [token_dtype(v).name for v in (256, 257, 65_536, 65_537)] == ["uint8", "uint16", "uint16", "uint32"]
    tokenizer = word_tokenizer(str(tmp_path / "tok"), words=300)
    source = write_jsonl(str(tmp_path / "d.jsonl"), ["w1 w2 w299", "w3"])
    corpus = TokenCorpus(prepare_corpus(source, tokenizer, "text", 0, str(tmp_path / "cache"), workers=1, progress=False))
    assert corpus.meta["dtype"] == "uint16" and corpus.vocab_size == 302
    assert corpus.read(0, len(corpus)).tolist() == [3, 4, 301, 1, 5, 1]  # each document ends with EOS
    assert corpus.document_starts.tolist() == [0, 4]


def test_builtin_corpus_is_the_same_byte_stream_as_before(tmp_path):
    """stdlib files joined by NUL, cut at max_bytes: only the last byte may differ (NUL now),
    and it begins no training window."""
    max_bytes = 200_000
    path = prepare_corpus("stdlib", None, "text", max_bytes, str(tmp_path), workers=1, progress=False)
    chunks = []
    for name in stdlib_files():
        with open(name, "rb") as f:
            chunks.append(f.read())
        if sum(len(c) + 1 for c in chunks) >= max_bytes:
            break
    before = b"\0".join(chunks)[:max_bytes]
    stream = TokenCorpus(path).read(0, max_bytes)
    assert len(stream) == len(before) and stream[:-1].tobytes() == np.frombuffer(before[:-1], np.uint8).astype(np.int64).tobytes()


class _CountingCorpus(TokenCorpus):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.reads: list[int] = []

    def read(self, start: int, length: int) -> np.ndarray:
        self.reads.append(start)
        return super().read(start, length)


def test_sampler_is_disjoint_per_rank_resumable_and_reshuffles_each_epoch(tmp_path):
    source = write_jsonl(str(tmp_path / "d.jsonl"), [f"doc {i} " * 20 for i in range(30)])
    corpus = _CountingCorpus(prepare_corpus(source, None, "text", 0, str(tmp_path), workers=1, progress=False))
    seq_len, batch = 16, 8
    sampler = BatchSampler(corpus, seq_len, batch, seed=3)
    windows = len(sampler.windows)
    inputs, labels = sampler.global_batch(2)
    assert torch_equal(inputs[:, 1:], labels[:, :-1])
    corpus.reads.clear()
    shares = [sampler.local_batch(2, r, 4)[0] for r in range(4)]
    assert torch_equal(np.concatenate(shares), inputs)  # the ranks' shares are the global batch, disjoint
    assert len(corpus.reads) == batch  # every rank read only its own 2 windows
    assert torch_equal(BatchSampler(corpus, seq_len, batch, seed=3).global_batch(2)[0], inputs)  # resume = step
    assert not torch_equal(BatchSampler(corpus, seq_len, batch, seed=4).global_batch(2)[0], inputs)
    first, second = (sampler._window_ids(np.arange(epoch * windows, (epoch + 1) * windows)) for epoch in (0, 1))
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(windows))  # each window once an epoch
    assert not np.array_equal(first, second)  # in a new order


def torch_equal(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_data_errors_are_one_line_config_errors(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    no_field = tmp_path / "bad.jsonl"
    no_field.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    small = write_jsonl(str(tmp_path / "small.jsonl"), ["a short one"])
    big_tokenizer = word_tokenizer(str(tmp_path / "tok"), words=1000)
    cases = {
        f"--data.source={missing}": "no such file or folder",
        f"--data.source={empty}": "empty",
        f"--data.source={no_field}": "bad.jsonl:2: no text field 'text'",
        f"--data.tokenizer={big_tokenizer}": "the tokenizer has 1,002 ids but the model's vocab_size is",
        f"--data.source={small}": "fewer than one global batch of 2",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError, match=None) as raised:
            validate(data_recipe(tmp_path, override), 1)
        assert expected in str(raised.value) and "\n" not in str(raised.value), (override, str(raised.value))
    with pytest.raises(ConfigError, match="held-out sequences"):
        validate(data_recipe(tmp_path, f"--data.source={write_jsonl(str(tmp_path / 'm.jsonl'), ['x' * 100])}",
                             "--eval.every=1", "--eval.held_out=0.1"), 1)
    with pytest.raises(ConfigError, match="data.document_mask: position ids are not carried"):
        validate(data_recipe(tmp_path, "--data.document_mask=true", "--parallel.pp=2",
                             "--train.global_batch_size=4"), 2)


def test_cli_prepares_and_reports_a_bad_source_with_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    done = subprocess.run([sys.executable, "-m", "harness.data", "prepare", "--source", str(bad), "--out",
                           str(tmp_path / "cache")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "bad.jsonl:1: not a JSON object" in done.stderr
    good = write_jsonl(str(tmp_path / "good.jsonl"), ["one", "two"])
    done = subprocess.run([sys.executable, "-m", "harness.data", "prepare", "--source", good, "--out",
                           str(tmp_path / "cache"), "--workers", "1"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "8 tokens (uint8), 2 documents" in done.stdout


def test_saved_hf_dataset_is_a_source(tmp_path):
    datasets = pytest.importorskip("datasets", reason="optional: pip install -e '.[data]'")
    saved = datasets.Dataset.from_dict({"text": ["hello world", "second doc"], "id": [1, 2]})
    saved.save_to_disk(str(tmp_path / "saved"))
    corpus = TokenCorpus(prepare_corpus(str(tmp_path / "saved"), None, "text", 0, str(tmp_path / "cache"),
                                        workers=1, progress=False))
    assert corpus.read(0, len(corpus)).astype(np.uint8).tobytes() == b"hello world\0second doc\0"
    datasets.DatasetDict({"train": saved}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataError, match="a saved DatasetDict; point it at one split's folder, e.g. .*splits/train"):
        prepare_corpus(str(tmp_path / "splits"), None, "text", 0, str(tmp_path / "cache"), workers=1, progress=False)


def test_stale_temporaries_of_killed_prepares_are_removed(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()
    host = socket.gethostname()
    dead = cache / f"aaaa.tmp-{host}-{finished.pid}"  # its process is gone
    running = cache / f"bbbb.tmp-{host}-{os.getpid()}"  # a prepare still at work on this host
    elsewhere = cache / "cccc.tmp-other-host-7"  # another host's, written to a moment ago
    abandoned = cache / "dddd.tmp-other-host-8"  # another host's, untouched for two days
    for folder in (dead, running, elsewhere, abandoned):
        folder.mkdir()
        (folder / "tokens_00000.bin").write_bytes(b"x")
    two_days_ago = time.time() - 2 * 86_400
    for path in (abandoned / "tokens_00000.bin", abandoned):
        os.utime(path, (two_days_ago, two_days_ago))
    source = write_jsonl(str(tmp_path / "d.jsonl"), ["one", "two"])
    prepare_corpus(source, None, "text", 0, str(cache), workers=1, progress=False)
    assert sorted(p.name for p in cache.iterdir() if ".tmp-" in p.name) == [running.name, elsewhere.name]


def test_invalid_utf8_is_replaced_counted_and_reported_at_prepare(tmp_path, caplog):
    folder = tmp_path / "source"
    folder.mkdir()
    # \xe9 before a space, then \xff and \xfe: 3 invalid sequences; the encoded U+FFFD is valid text.
    (folder / "a.txt").write_bytes(b"caf\xe9 ok \xff\xfe end \xef\xbf\xbd kept\n")
    (folder / "b.jsonl").write_bytes(b'{"text": "bad \x80 byte"}\n')
    (folder / "c.txt").write_text("clean\n")
    with caplog.at_level(logging.WARNING, logger="harness.data.prepare"):
        path = prepare_corpus(str(folder), None, "text", 0, str(tmp_path / "cache"), workers=1, progress=False)
    assert caplog.messages == [f"data: 4 invalid UTF-8 sequences replaced with U+FFFD in 2 files (first: {folder}/a.txt)"]
    corpus = TokenCorpus(path)
    stream = corpus.read(0, len(corpus)).astype(np.uint8).tobytes()
    assert stream.startswith("caf\ufffd ok \ufffd\ufffd end \ufffd kept\n\0".encode())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="harness.data.prepare"):
        prepare_corpus(str(folder), None, "text", 0, str(tmp_path / "cache"), workers=1, progress=False)
    assert caplog.messages == []  # said when preparing, not on every reuse


def test_training_and_held_out_windows_share_no_token():
    """Window i is tokens [i*seq_len, (i+1)*seq_len]: its inputs and, shifted by one, its labels."""
    seq_len = 16
    train, held_out = split_windows(4_001, seq_len, 0.1)
    last_training_token = train[-1] * seq_len + seq_len
    first_held_out_token = held_out[0] * seq_len
    assert last_training_token < first_held_out_token
    assert len(train) == 225 and len(held_out) == 24  # the training split is as before


def test_the_fingerprint_is_computed_once_per_job(tmp_path, monkeypatch):
    """The launcher's validation computes it; the workers it starts inherit its environment and
    neither their validation nor their loading stats the sources again."""
    computed = []

    def counted(*args):
        computed.append(args)
        return fingerprint(*args)

    monkeypatch.setattr(prepare_module, "fingerprint", counted)
    cfg = data_recipe(tmp_path, f"--data.source={write_jsonl(str(tmp_path / 'd.jsonl'), ['x ' * 100])}")
    check_corpus(cfg)  # the launcher
    monkeypatch.setenv("LOCAL_RANK", "0")
    check_corpus(cfg)  # a worker's validation
    load_tokens(cfg.data)  # a worker's loading
    assert len(computed) == 1
    other = data_recipe(tmp_path, f"--data.source={write_jsonl(str(tmp_path / 'e.jsonl'), ['y ' * 100])}")
    load_tokens(other.data)
    assert len(computed) == 2  # another source is another corpus
