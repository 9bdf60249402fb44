"""Tied input and output embeddings stay one weight on every layout: one process (where FSDP is
skipped), FSDP2, and pipeline stages that each hold a copy (gradients summed between the first
and the last stage; V placement puts both on one rank). Gemma 2 with its scalars away from
neutral (embedding normaliser, logit and attention soft-caps) shows a dropped piece too."""

from __future__ import annotations

import json

import pytest

from tests.families import tiny_config as family_config
from tests.layout_run import assert_matches_reference, train_layout
from tests.multiproc import run_ranks
from tests.reference import reference_run, tiny_config

LAYOUTS = {
    "one-process": (1, []),
    "fsdp2": (2, ["--parallel.dp_shard=2"]),
    "pp2-1F1B": (2, ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_microbatches=2"]),
    "pp2-DualPipeV-full": (2, ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=DualPipeV",
                               "--parallel.pp_microbatches=4", "--train.micro_batch_size=4", "--ac.mode=full"]),
    "pp2xfsdp2": (4, ["--parallel.pp=2", "--parallel.dp_shard=2", "--parallel.pp_microbatches=2"]),
}


@pytest.fixture(scope="module")
def gemma2_path(tmp_path_factory):
    config = family_config("gemma2", tied=True)
    folder = tmp_path_factory.mktemp("gemma2")
    config.save_pretrained(folder)
    return str(folder / "config.json")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_tied_model_matches_single_process(layout, gemma2_path):
    world, flags = LAYOUTS[layout]
    cfg = tiny_config(f"--model.path={gemma2_path}", *flags)
    with open(gemma2_path) as f:
        assert json.load(f)["tie_word_embeddings"] is True
    results = run_ranks(train_layout, world, cfg)
    assert_matches_reference(results, reference_run(cfg))
