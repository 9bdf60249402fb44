"""Stage split without processes: which modules land on which stage, canonical parameter names,
and a chain of stages computing exactly what the whole model computes."""

from __future__ import annotations

import pytest
import torch

from harness.materialize import materialize
from harness.models import build_meta_model, load_config, reference_model
from parallel.pipeline import stage_ids_for_rank
from harness.pipeline_stage import stage_builder
from parallel.pipeline_split import stage_module_names

E, N, H = "model.embed_tokens", "model.norm", "lm_head"


def layers(*indices: int) -> list[str]:
    return [f"model.layers.{i}" for i in indices]


@pytest.mark.parametrize("num_layers, num_stages, expected", [
    (4, 2, [[E, *layers(0, 1)], [*layers(2, 3), N, H]]),
    (4, 4, [[E, *layers(0)], layers(1), layers(2), [*layers(3), N, H]]),
    (5, 2, [[E, *layers(0, 1, 2)], [*layers(3, 4), N, H]]),
    (5, 4, [[E, *layers(0, 1)], layers(2), layers(3), [*layers(4), N, H]]),
    (8, 2, [[E, *layers(0, 1, 2, 3)], [*layers(4, 5, 6, 7), N, H]]),
    (8, 4, [[E, *layers(0, 1)], layers(2, 3), layers(4, 5), [*layers(6, 7), N, H]]),
])
def test_even_split_gives_the_remainder_to_the_first_stages(num_layers, num_stages, expected):
    assert stage_module_names(num_layers, num_stages, None) == expected


def test_layer_counts_per_stage():
    assert stage_module_names(5, 2, [1, 4]) == [[E, *layers(0)], [*layers(1, 2, 3, 4), N, H]]
    assert stage_module_names(4, 4, [0, 2, 2, 0]) == [[E], layers(0, 1), layers(2, 3), [N, H]]


def test_explicit_module_lists_are_taken_as_given():
    explicit = [[E], [*layers(0, 1, 2)], [*layers(3), N, H]]
    assert stage_module_names(4, 3, explicit) == explicit


@pytest.mark.parametrize("layout, message", [
    ([[E, *layers(0, 1)], [*layers(3, 2), N, H]], "out of order"),
    ([[E, *layers(0, 1)], [*layers(2), N, H]], "missing"),
    ([[E, *layers(0, 1)], [*layers(2, 3), N, H, "model.rotary"]], "unknown"),
    ([[E, *layers(0, 1, 2, 3), N, H]], "1 module lists for 2 stages"),
])
def test_bad_explicit_lists_name_the_field(layout, message):
    with pytest.raises(ValueError, match=rf"parallel\.pp_layers_per_stage.*{message}"):
        stage_module_names(4, 2, layout)


def test_stage_placement_loop_and_v():
    assert [stage_ids_for_rank("1F1B", 4, 1, r) for r in range(4)] == [[0], [1], [2], [3]]
    assert [stage_ids_for_rank("Interleaved1F1B", 2, 3, r) for r in range(2)] == [[0, 2, 4], [1, 3, 5]]
    assert [stage_ids_for_rank("DualPipeV", 4, 2, r) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]


@pytest.mark.parametrize("preset", ["llama", "qwen3_moe"])
def test_stages_keep_canonical_names_and_chain_to_the_whole_model(preset):
    config = load_config(preset, None, {"num_hidden_layers": 5})
    reference = reference_model(config, seed=0)
    names = stage_module_names(5, 3, None)
    build = stage_builder(build_meta_model(config))
    stages = [build(stage_names) for stage_names in names]
    keys = [list(stage.state_dict()) for stage in stages]
    assert sorted(k for stage_keys in keys for k in stage_keys) == sorted(reference.state_dict())
    assert keys[0][0] == "model.embed_tokens.weight" and "lm_head.weight" in keys[2]
    assert all(k.startswith(("model.layers.2.", "model.layers.3.")) for k in keys[1])
    assert all(stage.model.rotary_emb is not None for stage in stages)
    for stage in stages:
        materialize(stage, reference, "cpu")
    inputs = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden = inputs
    with torch.no_grad():
        for stage in stages:
            hidden = stage(hidden)
        torch.testing.assert_close(hidden, reference(input_ids=inputs).logits, atol=0, rtol=0)


def test_stage_without_layers_holds_only_norm_and_head():
    config = load_config("llama", None)
    build = stage_builder(build_meta_model(config))
    stages = [build(stage_names) for stage_names in stage_module_names(4, 2, [4, 0])]
    assert sorted(stages[1].state_dict()) == ["lm_head.weight", "model.norm.weight"]


def test_tied_embeddings_are_refused():
    config = load_config("llama", None, {"tie_word_embeddings": True})
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        stage_builder(build_meta_model(config))
