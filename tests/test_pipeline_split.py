"""Stage split without processes: which modules land on which stage, canonical parameter names,
and a chain of stages computing exactly what the whole model computes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from harness.config import ConfigError
from harness.materialize import materialize
from harness.model_parts import check_pipeline_support
from harness.models import build_meta_model, load_config, reference_model
from harness.pipeline_stage import stage_builder
from harness.validation import validate
from parallel.pipeline import stage_ids_for_rank
from parallel.pipeline_split import stage_module_names
from tests.families import HAND_SHRUNK, hand_shrunk_config, tiny_config as tiny_family
from tests.reference import tiny_config

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


def _assert_chain_is_the_whole_model(stages: list, reference: torch.nn.Module) -> None:
    """Token ids through every stage in turn give the whole model's logits, bitwise."""
    inputs = torch.randint(0, reference.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden = inputs
    with torch.no_grad():
        for stage in stages:
            hidden = stage(hidden)
        torch.testing.assert_close(hidden, reference(input_ids=inputs).logits, atol=0, rtol=0)


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
    _assert_chain_is_the_whole_model(stages, reference)


def test_stage_without_layers_holds_only_norm_and_head():
    config = load_config("llama", None)
    build = stage_builder(build_meta_model(config))
    stages = [build(stage_names) for stage_names in stage_module_names(4, 2, [4, 0])]
    assert sorted(stages[1].state_dict()) == ["lm_head.weight", "model.norm.weight"]


def test_tied_stages_hold_their_own_copy_of_the_shared_weight():
    config = load_config("llama", None, {"tie_word_embeddings": True})
    build = stage_builder(build_meta_model(config))
    first, last = [build(stage_names) for stage_names in stage_module_names(4, 2, None)]
    assert "model.embed_tokens.weight" in first.state_dict() and "lm_head.weight" not in first.state_dict()
    assert "lm_head.weight" in last.state_dict() and "model.embed_tokens.weight" not in last.state_dict()


# A stage that dropped a family piece (a logit scale, a soft-cap, an embedding multiplier, a
# per-layer-type rotary or mask, a non-attention mixer) would not reproduce the whole model.
@pytest.mark.parametrize("family", sorted(HAND_SHRUNK))
def test_stages_of_every_family_chain_to_the_whole_model(family):
    config = hand_shrunk_config(family)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    build = stage_builder(build_meta_model(config))
    stages = [build(names) for names in stage_module_names(config.num_hidden_layers, 3, [1, 2, 1])]
    for stage in stages:
        materialize(stage, reference, "cpu")
    _assert_chain_is_the_whole_model(stages, reference)


# Parts of the base model around the layers: GPT-2's and StarCoder's position tables, BLOOM's
# embedding norm and BioGPT's and OPT's positions go with the embeddings; BioGPT's, CTRL's and
# LFM3's final norms (not named like Llama's: LFM3's is `embedding_norm`) and BioGPT's head
# (`output_projection`) with the last stage. Granite-SWA picks each layer's rotary theta by the
# layer's index in the loop (and its mask by layer type), which stand-ins for other stages' layers keep.
# Cohere-Compass assigns hidden_states again after each layer's call (a no-op without images).
@pytest.mark.parametrize("family", ["gpt2", "gpt_bigcode", "bloom", "biogpt", "ctrl", "opt", "lfm3", "granite_swa",
                                    "cohere_compass_text"])
@pytest.mark.parametrize("layers_per_stage", [[1, 2, 1], [0, 3, 1], [1, 3, 0]])
def test_parts_around_the_layers_go_with_the_first_and_last_stage(family, layers_per_stage):
    config = tiny_family(family)
    config.use_cache = False
    reference = reference_model(config, seed=0)
    build = stage_builder(build_meta_model(config))
    stages = [build(names) for names in stage_module_names(config.num_hidden_layers, 3, layers_per_stage)]
    keys = [key for stage in stages for key in stage.state_dict()]
    assert sorted(keys) == sorted(reference.state_dict())  # each part on exactly one stage
    for stage in stages:
        materialize(stage, reference, "cpu")
    _assert_chain_is_the_whole_model(stages, reference)


def test_a_family_stages_cannot_carry_is_refused_before_any_process(tmp_path):
    # DeepSeek-V4 merges its hyper-connection streams after the layers (hc_head): not a norm that
    # an earlier stage could pass its hidden states through in place of.
    config = tiny_family("deepseek_v4")
    config.save_pretrained(tmp_path)
    cfg = tiny_config(f"--model.path={tmp_path}/config.json", "--parallel.pp=2", "--parallel.dp_shard=1",
                      "--parallel.pp_microbatches=2")
    with pytest.raises(ConfigError, match=r"parts after its layers that are not norms \(hc_head\)"):
        validate(cfg, 2)
    # NanoChat runs its final norm before the layers too: no stage split keeps both calls.
    with pytest.raises(ValueError, match="runs norm inside or on both sides of its layer loop"):
        check_pipeline_support(build_meta_model(tiny_family("nanochat")))
    # Gemma 3n computes per-layer inputs from the token ids, which only the first stage receives.
    with pytest.raises(ValueError, match="per-layer inputs .* use parallel.pp=1"):
        check_pipeline_support(build_meta_model(AutoConfig.for_model("gemma3n_text")))
