"""Invalid UTF-8 in text sources: replaced with U+FFFD, as Python's "replace" error handler does,
and counted, so that prepare can say how much of a source was not text."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from contextlib import contextmanager

ERRORS = "harness.data.count_and_replace"  # for open(..., errors=ERRORS)
_replaced = 0  # sequences replaced in this process so far; a codec error handler has no other state


def _count_and_replace(error: UnicodeError) -> tuple[str, int]:
    global _replaced
    _replaced += 1
    return codecs.replace_errors(error)


codecs.register_error(ERRORS, _count_and_replace)


class ReplacedSequences:
    """The invalid sequences that reading a source replaced, and the files that held them."""

    def __init__(self) -> None:
        self.sequences = 0
        self.files: list[str] = []

    @contextmanager
    def reading(self, path: str) -> Iterator[None]:
        """Counts what is replaced while `path` is read inside the block (with errors=ERRORS)."""
        before = _replaced
        yield
        if _replaced > before:
            self.sequences += _replaced - before
            self.files.append(path)

    def line(self) -> str:
        sequences = f"{self.sequences:,} invalid UTF-8 sequence{'s' if self.sequences > 1 else ''}"
        files = f"{len(self.files):,} file{'s' if len(self.files) > 1 else ''}"
        return f"data: {sequences} replaced with U+FFFD in {files} (first: {self.files[0]})"
