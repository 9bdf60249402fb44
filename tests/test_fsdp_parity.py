"""FSDP2 and HSDP reproduce the single-process losses and parameters (fp32, CPU, gloo)."""

import pytest

from tests.layout_run import assert_matches_reference, train_layout
from tests.multiproc import run_ranks
from tests.reference import reference_run, tiny_config


@pytest.mark.parametrize("world_size, layout", [
    # 4 micro batches of 1 per rank: gradient accumulation against one forward of the whole batch.
    (2, ["--parallel.dp_shard=2", "--train.micro_batch_size=1"]),
    (4, ["--parallel.dp_shard=4"]),
    (4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"]),
], ids=["fsdp2-accumulate4", "fsdp4", "hsdp2x2"])
def test_layout_matches_single_process(world_size, layout):
    cfg = tiny_config(*layout)
    results = run_ranks(train_layout, world_size, cfg)
    reference = reference_run(cfg)
    assert_matches_reference(results, reference)
    losses = reference[0]
    assert losses[-1] < losses[0]

