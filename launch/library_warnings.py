"""Warnings that torch and transformers raise while a recipe is validated, kept off the terminal.

Validation builds the model and measures it on fake tensors, and the libraries warn along the way
(torch's module tracker asks to "file a bug to PyTorch" for a checkpointed layer's re-entry).
On bad input the user must see one line, the error; on good input the warnings go to the run's
log (`logs/launch.log`, rewritten at each start), and `--verbose` prints them after the error.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Loggers that print on their own (transformers installs a stderr handler on its root logger).
_LIBRARY_LOGGERS = ("transformers", "torch", "huggingface_hub")


class _LineCollector(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """Yields the list that collects, one line each and as they come, the Python warnings and the
    libraries' warning log records raised inside the block, instead of printing them."""
    lines: list[str] = []
    collector = _LineCollector(lines)
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    saved = [(logger.handlers, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers, logger.propagate = [collector], False
    try:
        with warnings.catch_warnings():  # restores showwarning on the way out
            warnings.showwarning = lambda message, category, filename, lineno, *_: lines.append(
                f"{filename}:{lineno}: {category.__name__}: {message}")
            yield lines
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved):
            logger.handlers, logger.propagate = handlers, propagate


def write_warnings(lines: list[str], path: str) -> None:
    """`lines` as the log at `path`, replacing the previous start's."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(f"{line}\n" for line in lines))
