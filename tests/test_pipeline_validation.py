"""validate_pipeline: every impossible layout is one ValueError line naming the field and the fix."""

from __future__ import annotations

import pytest

from parallel.pipeline import SCHEDULES, validate_pipeline

GOOD = dict(num_layers=8, pp=2, schedule="1F1B", stages_per_rank=None, n_microbatches=4,
            layers_per_stage=None, local_batch_size=8)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_valid_layout_passes_for_every_schedule(schedule):
    validate_pipeline(**{**GOOD, "schedule": schedule})


@pytest.mark.parametrize("changes, field, fix", [
    (dict(pp=1), "parallel.pp=1", "at least 2"),
    (dict(num_layers=1), "parallel.pp:", "lower parallel.pp"),
    (dict(schedule="Interleaved1F1B", num_layers=3), "parallel.pp:", "4 pipeline stages"),
    (dict(schedule="Zigzag"), "parallel.pp_schedule='Zigzag'", "'GPipe', '1F1B', 'Interleaved1F1B'"),
    (dict(stages_per_rank=2), "parallel.pp_schedule=1F1B", "pp_stages_per_rank=1"),
    (dict(schedule="LoopedBFS", stages_per_rank=1), "parallel.pp_schedule=LoopedBFS", "pp_stages_per_rank>=2"),
    (dict(schedule="ZBVZeroBubble", stages_per_rank=3), "parallel.pp_schedule=ZBVZeroBubble",
     "pp_stages_per_rank=2"),
    (dict(local_batch_size=6), "parallel.pp_microbatches=4", "divisor of 6"),
    (dict(n_microbatches=1, local_batch_size=1), "parallel.pp_microbatches=1", "at least 2"),
    (dict(schedule="DualPipeV", n_microbatches=2), "parallel.pp_microbatches=2", "at least 4"),
    (dict(schedule="Interleaved1F1B", pp=4, n_microbatches=2), "parallel.pp_microbatches=2", "at least 4"),
    (dict(schedule="ZBVZeroBubble", pp=4, n_microbatches=2), "parallel.pp_microbatches=2", "at least 4"),
    (dict(schedule="InterleavedZeroBubble", n_microbatches=5, local_batch_size=5), "parallel.pp_microbatches=5",
     "multiple of 2"),
    (dict(layers_per_stage=[4, 3]), "parallel.pp_layers_per_stage=[4, 3]", "add up to 8"),
    (dict(layers_per_stage=[8]), "parallel.pp_layers_per_stage=[8]", "one layer count per stage"),
    (dict(schedule="LoopedBFS", layers_per_stage=[4, 0, 0, 4]), "parallel.pp_layers_per_stage",
     "at least one layer"),
])
def test_impossible_layouts_name_the_field_and_the_fix(changes, field, fix):
    with pytest.raises(ValueError) as error:
        validate_pipeline(**{**GOOD, **changes})
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(field) and fix in message, message
