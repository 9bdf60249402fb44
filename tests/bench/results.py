"""Where a benchmark's results go: one JSON file, its folder made if missing."""

from __future__ import annotations

import json
import os
from typing import Any


def write_results(path: str, results: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")
