"""Per-step metrics: a JSONL file and a live progress line on rank 0."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any


class MetricsLog:
    """Writes one JSON object per step; shows a progress bar on a terminal, log lines otherwise."""

    def __init__(self, path: str | None, total_steps: int, log_every: int, progress: bool, enabled: bool) -> None:
        self.total_steps, self.log_every, self.enabled = total_steps, log_every, enabled
        self.live = enabled and progress and sys.stdout.isatty()
        self.started = time.perf_counter()
        self.file = None
        if enabled and path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a")

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        step = row["step"]
        if self.live:
            print("\r" + self._progress_line(row), end="", flush=True)
            if step == self.total_steps:
                print()
        elif step % self.log_every == 0 or step == self.total_steps or step == 1:
            print(self._plain_line(row), flush=True)

    def _progress_line(self, row: dict[str, Any]) -> str:
        done = row["step"] / self.total_steps
        bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done - elapsed if done > 0 else math.nan
        return f"[{bar}] {self._plain_line(row)} eta {eta:5.0f}s"

    @staticmethod
    def _plain_line(row: dict[str, Any]) -> str:
        return (f"step {row['step']:>5} | loss {row['loss']:.4f} | grad_norm {row['grad_norm']:.3f} | "
                f"lr {row['lr']:.2e} | {row['tokens_per_s']:,.0f} tok/s | {row['step_time_s'] * 1000:.0f} ms | "
                f"mfu {row['mfu']:.1%}")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
