"""The overhead benchmark's memory accounting on real gloo ranks: each of 2 FSDP2 ranks holds half the state."""

from __future__ import annotations

from harness.models import load_config, reference_model
from tests.bench.overhead import bench_config, layout


def test_dp_shard_2_holds_half_of_the_state_per_rank():
    row = layout(2, 2)
    cfg = bench_config(1, 2)
    model = reference_model(load_config(cfg.model.preset, None, cfg.model.overrides), seed=0)
    params = list(model.parameters())
    total = sum(p.numel() * p.element_size() for p in params)
    # FSDP2 splits dim 0 in chunks of ceil(rows / 2): a rank's share is off by at most half a row.
    slack = sum(p[0].numel() * p.element_size() for p in params) / 2
    for key, full, copies in (("param", total, 1), ("grad", total, 1), ("optimizer", 2 * total, 2)):
        largest, smallest = row[f"{key}_bytes_max"], row[f"{key}_bytes_min"]
        assert largest + smallest == full, (key, row)  # nothing counted twice, no padding counted
        assert largest - full / 2 <= copies * slack, (key, row)
    assert row["tokens_per_s"] > 0
