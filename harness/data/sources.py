"""Where documents come from: the built-in corpus, local .txt / .jsonl / .parquet files or folders
of them, and Hugging Face `datasets` saved with `save_to_disk` (optional dependency).

A document is `str`, or `bytes` for the built-in corpus (standard-library sources are read as
bytes: a few are deliberately not UTF-8). Every problem is a `DataError` with one line that
names the file and the fix.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from collections.abc import Iterator

from harness.data.invalid_utf8 import ERRORS as INVALID_UTF8, ReplacedSequences

STDLIB = "stdlib"
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
INSTALL_HINT = "pip install -e '.[data]'"
TEXT_TYPES = ("string", "large_string", "string_view")  # Arrow's text types, as pyarrow and datasets name them


class DataError(ValueError):
    """A user error in the data sources; the message is the one line shown."""


def is_saved_dataset(path: str) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk`."""
    return os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))


def source_files(source: str) -> list[str]:
    """The files a source stands for, in a fixed order (a saved dataset is one entry: its folder)."""
    if source == STDLIB:
        return stdlib_files()
    if not os.path.exists(source):
        raise DataError(f"data.source={source}: no such file or folder; use 'stdlib' or local "
                        ".txt/.jsonl/.parquet files")
    if os.path.isfile(source):
        if not source.endswith(FILE_SUFFIXES):
            raise DataError(f"data.source={source}: expected a .txt, .jsonl or .parquet file, or a folder of them")
        files = [source]
    elif is_saved_dataset(source):
        files = [source]
    elif os.path.isfile(os.path.join(source, "dataset_dict.json")):
        splits = sorted(n for n in os.listdir(source) if is_saved_dataset(os.path.join(source, n)))
        raise DataError(f"data.source={source}: a saved DatasetDict; point it at one split's folder, "
                        f"e.g. {os.path.join(source, splits[0] if splits else 'train')}")
    else:
        files = []
        for folder, subfolders, names in os.walk(source):
            subfolders.sort()
            files.extend(os.path.join(folder, n) for n in sorted(names) if n.endswith(FILE_SUFFIXES))
        if not files:
            raise DataError(f"data.source={source}: the folder holds no .txt, .jsonl or .parquet file")
    if all(os.path.isfile(f) and os.path.getsize(f) == 0 for f in files):
        raise DataError(f"data.source={source}: empty; give files that hold text")
    return files


def stdlib_files() -> list[str]:
    """This Python's standard-library .py files in a fixed order."""
    files = []
    for folder, subfolders, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__")]
        files.extend(os.path.join(folder, n) for n in names if n.endswith(".py"))
    return sorted(files)


def documents(source: str, text_field: str, max_bytes: int, replaced: ReplacedSequences) -> Iterator[str | bytes]:
    """Every document of the source in order; invalid UTF-8 in .txt and .jsonl files becomes U+FFFD,
    counted in `replaced`. `max_bytes` bounds the built-in corpus only: its documents stop where
    they and one separator byte each fill `max_bytes`."""
    if source == STDLIB:
        yield from _stdlib_documents(max_bytes)
        return
    for path in source_files(source):
        if os.path.isdir(path):
            yield from _saved_dataset_documents(path, text_field)
        elif path.endswith(".parquet"):
            yield from _parquet_documents(path, text_field)
        else:
            with replaced.reading(path):
                yield from _jsonl_documents(path, text_field) if path.endswith(".jsonl") else _text_document(path)


def _text_document(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors=INVALID_UTF8) as f:
        text = f.read()
    if text:
        yield text


def _stdlib_documents(max_bytes: int) -> Iterator[bytes]:
    left = max_bytes
    for path in stdlib_files():
        with open(path, "rb") as f:
            chunk = f.read(left - 1)
        yield chunk
        left -= len(chunk) + 1
        if left <= 1:
            return


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors=INVALID_UTF8) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not a JSON object ({e.msg}); fix or remove the line") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise DataError(f"{path}:{number}: no text field {text_field!r}; set data.text_field to the "
                                "field that holds the text")
            yield record[text_field]


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow; {INSTALL_HINT}") from None
    # A damaged footer fails on opening (ArrowInvalid), a damaged page only when it is read (OSError).
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        if text_field not in schema.names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); "
                            "set data.text_field")
        column = schema.field(text_field).type
        _check_text_column(path, text_field, str(column.value_type if pa.types.is_dictionary(column) else column))
        for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
            yield from (text for text in batch.column(0).to_pylist() if text)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable .parquet file ({error_line(e)}); replace or remove it") from None


def _saved_dataset_documents(path: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a saved Hugging Face dataset needs the datasets package; {INSTALL_HINT}") from None
    dataset = datasets.load_from_disk(path)
    if text_field not in dataset.column_names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(dataset.column_names)}); "
                        "set data.text_field")
    feature = dataset.features[text_field]
    _check_text_column(path, text_field, getattr(feature, "dtype", type(feature).__name__))
    for batch in dataset.select_columns([text_field]).iter(batch_size=1024):
        yield from (text for text in batch[text_field] if text)


def _check_text_column(path: str, text_field: str, type_name: str) -> None:
    if type_name not in TEXT_TYPES:
        raise DataError(f"{path}: column {text_field!r} holds {type_name} values, not text; set data.text_field "
                        "to a text column")


def error_line(error: Exception) -> str:
    """A library's error in one line: its type and the first line of its message."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def describe(source: str) -> str:
    return f"Python {sys.version_info.major}.{sys.version_info.minor} standard library sources" \
        if source == STDLIB else source
