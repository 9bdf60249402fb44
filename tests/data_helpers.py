"""Tiny corpora and tokenizers written into a test's temporary folder."""

from __future__ import annotations

import json
import os

from harness.config import Config, load_config


def write_jsonl(path: str, texts: list[str], field: str = "text") -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps({field: t}) + "\n" for t in texts)
    return path


def word_tokenizer(folder: str, words: int) -> str:
    """A local word-level HF tokenizer with `words` ids plus [UNK] and [EOS], saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i + 2 for i in range(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(folder)
    return folder


def corpus_folder(root: str, documents: int = 40) -> str:
    """A folder of one .txt, one .jsonl and (with pyarrow) one .parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = os.path.join(root, "corpus")
    os.makedirs(folder)
    with open(os.path.join(folder, "a.txt"), "w") as f:
        f.write("plain text document\n")
    write_jsonl(os.path.join(folder, "b.jsonl"), [f"json document {i} " * 5 for i in range(documents)])
    pq.write_table(pa.table({"text": [f"parquet row {i} " * 5 for i in range(documents)]}),
                   os.path.join(folder, "c.parquet"))
    return folder


def data_recipe(tmp_path, *overrides: str) -> Config:
    """A tiny llama on one rank (2 sequences of 16 tokens per step) whose cache and checkpoints
    are the test's own."""
    base = ["--model.preset=llama", "--parallel.dp_shard=1", "--train.global_batch_size=2",
            "--train.micro_batch_size=2", "--train.seq_len=16", f"--data.cache_dir={tmp_path / 'cache'}",
            f"--checkpoint.dir={tmp_path / 'checkpoints'}", "--train.metrics_file=null"]
    return load_config(None, [*base, *overrides])
