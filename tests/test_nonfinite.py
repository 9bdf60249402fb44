"""A non-finite loss or gradient norm stops training at that step on every rank, before its
optimizer step: the training loop on real gloo ranks. As launcher jobs (one line, exit 1, the
last good checkpoint left the newest): tests/test_launch_runs.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributed.tensor import DTensor

from harness.config import Config
from harness.nonfinite import NonFiniteStep
from harness.trainer import build_run, train_step
from harness.validation import validate
from tests.multiproc import run_ranks
from tests.reference import tiny_config

# One step at this rate leaves weights whose next forward overflows.
DIVERGING_LR = "1e30"


def _local_state(run) -> list[torch.Tensor]:
    """This rank's shard of every parameter and optimizer tensor, copied."""
    tensors = list(run.optimizer.param_groups[0]["params"])
    tensors += [v for state in run.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return [(t.to_local() if isinstance(t, DTensor) else t).detach().clone() for t in tensors]


def step_into_divergence(rank: int, world_size: int, cfg: Config) -> tuple[int | None, bool, int]:
    """One good step, then the step that diverges: the step it raised at, whether this rank's
    parameters and optimizer state are still those of the good step, and the step count."""
    run = build_run(cfg, validate(cfg, world_size))
    assert math.isfinite(train_step(run)["loss"])
    good = _local_state(run)
    try:
        train_step(run)
    except NonFiniteStep as bad:
        raised = bad.step
    else:
        raised = None
    after = _local_state(run)
    unchanged = len(after) == len(good) and all(torch.equal(a, b) for a, b in zip(after, good))
    return raised, unchanged, run.step


LAYOUTS = {
    "fsdp2": ["--parallel.dp_shard=2"],
    # The loss lives on the last stage only: the first stage must stop at the same step.
    "pp2": ["--parallel.pp=2", "--parallel.dp_shard=1", "--train.micro_batch_size=4"],
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_every_rank_stops_before_the_update_of_the_diverging_step(layout):
    cfg = tiny_config(f"--train.lr={DIVERGING_LR}", *LAYOUTS[layout])
    assert run_ranks(step_into_divergence, 2, cfg) == [(2, True, 1)] * 2
