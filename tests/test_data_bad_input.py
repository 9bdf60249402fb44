"""Bad data is refused in one line that names the field, what is wrong and the fix, before any
process starts: validation raises ConfigError, which the launcher prints as `error: ...` (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.config import ConfigError
from harness.data.prepare import prepare_corpus
from harness.data.sources import DataError
from harness.validation import validate
from tests.data_helpers import data_recipe, word_tokenizer, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "plenty of text for a few windows " * 20


def _refusal(tmp_path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as raised:
        validate(data_recipe(tmp_path, *overrides), 1)
    message = str(raised.value)
    assert "\n" not in message, message
    return message


def _corrupt_parquet(tmp_path, damage: str = "truncated") -> str:
    """A parquet file cut short (its footer is gone: opening fails) or with its first page header
    overwritten (opening works, reading fails)."""
    path = str(tmp_path / "corrupt.parquet")
    pq.write_table(pa.table({"text": [TEXT] * 4}), path)
    with open(path, "r+b") as f:
        if damage == "truncated":
            f.truncate(os.path.getsize(path) - 20)
        else:
            f.seek(4)
            f.write(b"\xff" * 64)
    return path


def test_parquet_column_that_holds_no_text(tmp_path):
    pq.write_table(pa.table({"text": list(range(100))}), tmp_path / "ints.parquet")
    message = _refusal(tmp_path, f"--data.source={tmp_path / 'ints.parquet'}")
    assert "ints.parquet: column 'text' holds int64 values, not text; set data.text_field to a text column" in message


def test_saved_dataset_column_that_holds_no_text(tmp_path):
    datasets = pytest.importorskip("datasets", reason="optional: pip install -e '.[data]'")
    datasets.Dataset.from_dict({"text": list(range(100))}).save_to_disk(str(tmp_path / "saved"))
    message = _refusal(tmp_path, f"--data.source={tmp_path / 'saved'}")
    assert "saved: column 'text' holds int64 values, not text; set data.text_field to a text column" in message


@pytest.mark.parametrize("damage", ["truncated", "page-header"])
def test_corrupt_parquet(tmp_path, damage):
    message = _refusal(tmp_path, f"--data.source={_corrupt_parquet(tmp_path, damage)}")
    assert "corrupt.parquet: not a readable .parquet file (" in message and "replace or remove it" in message


@pytest.mark.parametrize("content", [{"version": "1.0", "model": {"type": "Nope"}}, [1, 2]], ids=["fields", "list"])
def test_corrupt_tokenizer_json(tmp_path, content):
    tokenizer = word_tokenizer(str(tmp_path / "tok"), words=20)
    with open(os.path.join(tokenizer, "tokenizer.json"), "w") as f:
        json.dump(content, f)
    assert f"data.tokenizer={tokenizer}: cannot load it (" in _refusal(tmp_path, f"--data.tokenizer={tokenizer}")
    with pytest.raises(DataError, match="cannot load it"):  # `python -m harness.data prepare`: the same line
        prepare_corpus(write_jsonl(str(tmp_path / "d.jsonl"), [TEXT]), tokenizer, "text", 0, str(tmp_path / "cache"))


@pytest.mark.parametrize("cache_dir", ["/proc/harness_data_cache", "/proc"], ids=["cannot-create", "cannot-write"])
def test_cache_dir_that_cannot_be_written(tmp_path, cache_dir):
    source = write_jsonl(str(tmp_path / "d.jsonl"), [TEXT])
    message = _refusal(tmp_path, f"--data.source={source}", f"--data.cache_dir={cache_dir}")
    assert message.startswith(f"data.cache_dir={cache_dir}: cannot write there (")
    assert message.endswith("); choose a writable folder")


def test_broken_symlink_and_symlink_loop_in_a_source_folder(tmp_path):
    for name, links in [("broken", {"b.txt": "missing.txt"}), ("loop", {"x.txt": "y.txt", "y.txt": "x.txt"})]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "a.txt").write_text(TEXT)
        for link, target in links.items():
            os.symlink(target, folder / link)
        message = _refusal(tmp_path, f"--data.source={folder}")
        assert f"{folder}/{sorted(links)[0]}: a broken symbolic link (" in message and "fix or remove it" in message


def test_eval_steps_beyond_the_held_out_split_are_refused(tmp_path):
    """Evaluating more batches than the held-out split holds would wrap and count windows twice."""
    source = write_jsonl(str(tmp_path / "d.jsonl"), ["w " * 2_000])  # 4,001 tokens: 250 windows of 16
    ok = data_recipe(tmp_path, f"--data.source={source}", "--eval.every=1", "--eval.held_out=0.1", "--eval.steps=12")
    validate(ok, 1)  # 24 windows held out (one at the boundary left out): 12 batches of 2
    message = _refusal(tmp_path, f"--data.source={source}", "--eval.every=1", "--eval.held_out=0.1", "--eval.steps=13")
    assert message == ("eval.steps=13: 13 batches of train.global_batch_size=2 need 26 held-out sequences but "
                       "the held-out split has 24; lower eval.steps to at most 12 or raise eval.held_out")


@pytest.mark.parametrize("case", ["corrupt-parquet", "cache-dir"])
def test_launcher_exits_2_with_one_line(tmp_path, case):
    source = _corrupt_parquet(tmp_path) if case == "corrupt-parquet" else write_jsonl(str(tmp_path / "d.jsonl"), [TEXT])
    cache_dir = "/proc/harness_data_cache" if case == "cache-dir" else str(tmp_path / "cache")
    result = subprocess.run([sys.executable, "-m", "launch", f"--data.source={source}", f"--data.cache_dir={cache_dir}",
                             f"--run.dir={tmp_path / 'run'}", "--train.metrics_file=null"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data."), result.stderr
