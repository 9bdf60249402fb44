"""A run stopped and resumed writes the same metrics as one that never stopped, to the bit.

The training loop on real gloo ranks, twice into one run folder (stopped by a preemption request
after step 3, then the same command again) against once straight through. The rows of the steps
since the last logging step are written together, so the two runs write a step's row in
different company: steps 2 to 8 together in the straight run, 2 and 3, then 4 to 8 in the other.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.config import Config
from harness.trainer import train
from harness.validation import validate
from tests.multiproc import run_ranks
from tests.reference import tiny_config

STEPS, STOP = 8, 3
# What the data and the weights decide; time and memory are measurements of the machine.
MEASURED = {"tokens_per_s", "step_time_s", "mfu", "param_mib", "grad_mib", "optimizer_mib", "peak_mib"}


class SignalDuringStep:
    """SIGUSR1 as the loop sees it (`PreemptionRequest.requested`), arriving while step `step`
    runs: the loop reads the flag once per step."""

    def __init__(self, step: int) -> None:
        self.step, self.reads = step, 0

    @property
    def requested(self) -> bool:
        self.reads += 1
        return self.reads >= self.step


def train_ranks(rank: int, world_size: int, cfg: Config, stop_after: int | None) -> None:
    train(cfg, validate(cfg, world_size), SignalDuringStep(stop_after) if stop_after else None)


def _rows(metrics: Path) -> list[dict]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in MEASURED} for row in rows]


def _run(folder: Path, stop_after: int | None = None) -> list[dict]:
    # Four ranks that each hold a share of the loss: the sum of two shares (or of two and the
    # zeros of pipeline ranks without the last stage) is the same in any order; of four, not.
    cfg = tiny_config(f"--run.dir={folder}", f"--train.metrics_file={folder / 'metrics.jsonl'}",
                      f"--train.steps={STEPS}", f"--logging.log_every={STEPS}", "--parallel.dp_shard=4")
    run_ranks(train_ranks, 4, cfg, stop_after)
    return _rows(folder / "metrics.jsonl")


def test_resumed_metrics_are_bitwise_the_straight_runs(tmp_path):
    straight = _run(tmp_path / "straight")
    stopped = _run(tmp_path / "resumed", stop_after=STOP)
    assert [row["step"] for row in stopped] == list(range(1, STOP + 1))
    resumed = _run(tmp_path / "resumed")
    assert [row["step"] for row in resumed] == list(range(1, STEPS + 1))
    assert resumed == straight
