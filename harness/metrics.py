"""Per-step metrics: a JSONL file and a live progress line on rank 0."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any


class MetricsLog:
    """Writes one JSON object per step; shows a progress bar on a terminal, log lines otherwise.
    Rows arrive in bursts, on logging steps (`wants_row`), so the bar moves then."""

    def __init__(self, path: str | None, total_steps: int, log_every: int, progress: bool, enabled: bool,
                 start_step: int = 0, tensorboard_dir: str | None = None) -> None:
        """`start_step`: the step a run resumes from; rows after it (from the run that crashed
        or an older run in the same place) are dropped, so the file holds one run."""
        self.total_steps, self.log_every, self.enabled = total_steps, log_every, enabled
        self.live = enabled and progress and sys.stdout.isatty()
        self.started = time.perf_counter()
        self.file = None
        if enabled and path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            kept = _rows_up_to(path, start_step) if start_step and os.path.isfile(path) else []
            self.file = open(path, "w")
            self.file.writelines(kept)
        self.tensorboard = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(tensorboard_dir, purge_step=start_step + 1)

    def wants_row(self, step: int) -> bool:
        """Whether `step` is a logging step: the loop reads the device's values back only then (the
        same on every rank) and writes the rows of the steps in between with it."""
        return step == 1 or step % self.log_every == 0 or step == self.total_steps

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, row["step"])
        step = row["step"]
        if self.live:
            print("\r" + self._progress_line(row), end="", flush=True)
            if step == self.total_steps:
                print()
        elif self.wants_row(step):
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
                f"mfu {row['mfu']:.1%}"
                + (f" | val_loss {row['val_loss']:.4f} | val_ppl {row['val_ppl']:.2f}" if "val_loss" in row else ""))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _rows_up_to(path: str, step: int) -> list[str]:
    with open(path) as f:
        return [line for line in f if line.strip() and json.loads(line)["step"] <= step]


def report_outputs(metrics_file: str, checkpoint: str | None) -> list[str]:
    """Where a finished run left its metrics, plot and checkpoint (the plot is drawn here)."""
    from harness.plot import INSTALL_HINT, MetricsError, plot, read_rows

    lines = [f"metrics: {metrics_file}"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        lines.append(f"plot: skipped ({INSTALL_HINT}, or pip install -e '.[plot]')")
    else:
        png = os.path.splitext(metrics_file)[0] + ".png"
        try:
            plot(read_rows(metrics_file), png)
            lines.append(f"plot: {png}")
        except MetricsError as e:  # e.g. preempted before its first step: nothing to draw
            lines.append(f"plot: skipped ({e})")
    if checkpoint:
        lines.append(f"checkpoint: {checkpoint}")
    return lines
