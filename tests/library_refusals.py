"""Refusals that hold for what the locked transformers lacks (a family's experts not yet fused,
a forward that returns no router aux loss), not for a limit of the harness: on that version
they must happen; a newer transformers may lift them, and then the family must train instead."""

from __future__ import annotations

import pytest
import transformers

from harness.config import Config, ConfigError
from harness.validation import validate

# The transformers version of requirements.lock, which the library-dependent expectations name.
LIBRARY_VERSION = "5.25.0"


def on_library_version() -> bool:
    return transformers.__version__ == LIBRARY_VERSION


def refused_by_library(cfg: Config, world_size: int, reason: str) -> str:
    """The one-line refusal of `cfg`, which must contain `reason`; on another transformers version
    that accepts `cfg`, the test is skipped as lifted."""
    try:
        validate(cfg, world_size)
    except ConfigError as e:
        assert reason in str(e) and "\n" not in str(e), str(e)
        return str(e)
    if on_library_version():
        pytest.fail(f"accepted, but transformers {LIBRARY_VERSION} should refuse it ({reason})")
    pytest.skip(f"transformers {transformers.__version__} lifts this refusal ({reason})")
