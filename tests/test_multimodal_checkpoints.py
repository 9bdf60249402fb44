"""A multimodal checkpoint's language model loads through the multimodal model's own conversion
mapping, as `from_pretrained` of the multimodal class reads it: transformers' save_pretrained of
a tiny Kimi-K2.5 (the language model's layers stored as `blocks` under `language_model.model.`,
experts one tensor each, a vision tower whose fused `wqkv` is chunked and permuted for rotary)
and of a tiny MiniMax-M3-VL (experts as `block_sparse_moe.experts.N.w1 / w2 / w3`, merged and
renamed by the multimodal mapping only). Their text models train their first step as
`from_pretrained` of the multimodal class and a plain loop do, on 1 process, dp_shard=2 and
ep=2, and export writes the text model as its own family's save_pretrained does
(tests/family_matrix.py `export_round_trip`). Qwen3-VL-MoE, whose text model transformers gives
no causal-LM class, is refused in one line."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForMultimodalLM

from harness.config import ConfigError
from harness.hf_checkpoint import HFCheckpoint
from harness.materialize import materialize
from harness.models import build_meta_model, load_config, reference_model, weight_source
from harness.validation import validate
from tests.families import tiny_config as family_config
from tests.family_matrix import run_recipes
from tests.reference import tiny_config

# family -> (text family, tied head, tiny vision config)
MULTIMODAL = {
    "kimi_k25": ("deepseek_v3", False, dict(num_attention_heads=2, num_hidden_layers=1, hidden_size=32,
                                            intermediate_size=32, pos_emb_height=4, pos_emb_width=4,
                                            pos_emb_time=2)),
    "minimax_m3_vl": ("minimax_m3_vl_text", True, dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=28)),
    "qwen3_vl_moe": ("qwen3_vl_moe_text", False, dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2,
                                                      out_hidden_size=64, num_position_embeddings=16,
                                                      deepstack_visual_indexes=[0])),
}
TRAINED = ["kimi_k25", "minimax_m3_vl"]
# Checkpoint names that only the multimodal family's mapping turns into its language model's.
OWN_NAMES = {"kimi_k25": ".blocks.", "minimax_m3_vl": ".block_sparse_moe.experts.0.w1."}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, torch.nn.Module]]:
    """save_pretrained of each tiny multimodal model, randomly initialised, and the model."""
    folder = tmp_path_factory.mktemp("multimodal")
    saved = {}
    for family, (text, tied, vision) in MULTIMODAL.items():
        config = AutoConfig.for_model(family, text_config=family_config(text).to_dict(), vision_config=vision,
                                      tie_word_embeddings=tied)
        torch.manual_seed(0)
        model = AutoModelForMultimodalLM.from_config(config)
        path = str(folder / family)
        model.save_pretrained(path)
        saved[family] = (path, model)
    return saved


@pytest.mark.parametrize("family", TRAINED)
def test_language_model_loads_as_the_multimodal_from_pretrained(checkpoints, family):
    path, multimodal = checkpoints[family]
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert any(OWN_NAMES[family] in key for key in keys)
    config = load_config(None, path)
    assert config.model_type == MULTIMODAL[family][0] and config.tie_word_embeddings == MULTIMODAL[family][1]
    model = build_meta_model(config)
    source = weight_source(model, 0, path)
    source.check()
    assert isinstance(source, HFCheckpoint) and not any("vision" in key for key in source.keys_read())
    assert not source.whole_read_keys()  # the chunk + rotary permutation is the vision tower's
    materialize(model, source, "cpu")
    expected = {**{f"model.{k}": v for k, v in multimodal.model.language_model.state_dict().items()},
                "lm_head.weight": multimodal.lm_head.weight}
    for loaded in (model, reference_model(config, 0, path)):
        state = loaded.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[name], tensor) for name, tensor in expected.items())


def test_layouts_train_as_from_pretrained_and_export_the_text_model(checkpoints, tmp_path):
    def recipe(family, *flags):
        return tiny_config(f"--model.path={checkpoints[family][0]}", "--train.steps=1",
                           f"--run.dir={tmp_path}/{family}{len(flags)}", *flags)

    one = run_recipes(1, {family: recipe(family) for family in TRAINED}, exported=True)
    two = run_recipes(2, {**{f"{family}, dp_shard=2": recipe(family, "--parallel.dp_shard=2") for family in TRAINED},
                          **{f"{family}, ep=2": recipe(family, "--parallel.dp_shard=2", "--parallel.ep=2")
                             for family in TRAINED}}, exported=True)
    assert set(one.values()) | set(two.values()) == {"ok"}, {**one, **two}


def test_multimodal_model_without_a_causal_text_model_is_refused_in_one_line(checkpoints):
    path = checkpoints["qwen3_vl_moe"][0]
    with pytest.raises(ConfigError) as error:
        validate(tiny_config(f"--model.path={path}"), 1)
    message = str(error.value)
    expected = "qwen3_vl_moe's language model (qwen3_vl_moe_text) has no causal-LM class in transformers"
    assert "\n" not in message and expected in message, message


def test_an_operation_that_cannot_build_a_tensor_names_the_multimodal_family_and_operation(checkpoints, tmp_path):
    """Kimi-K2.5's experts' up projections cut to half the hidden width: the concatenation of
    gate and up rows fails; validation names the family's conversion, not missing tensors."""
    path, _ = checkpoints["kimi_k25"]
    tensors = load_file(os.path.join(path, "model.safetensors"))
    cut = {k: v[:, :v.shape[1] // 2].contiguous() if ".blocks.1.mlp.experts." in k and "up_proj" in k else v
           for k, v in tensors.items()}
    save_file(cut, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
    with pytest.raises(ConfigError) as error:
        validate(tiny_config(f"--model.path={tmp_path}"), 1)
    message = str(error.value)
    assert "\n" not in message and "by kimi_k25's Concatenate" in message and "missing" not in message, message
