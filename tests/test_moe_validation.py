"""Expert-parallel refusals known from the config come from validation, before any process
starts, in one line: experts that are not transformers' fused experts modules (JetMoE keeps a
per-expert module list; Llama 4's experts are not ExpertsInterface classes). Which families lack
what is the locked transformers' fact (tests/library_refusals.py)."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from harness.validation import validate
from tests.families import tiny_config as family_config
from tests.library_refusals import refused_by_library
from tests.reference import tiny_config

_SMALL = dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, vocab_size=256)


@pytest.mark.parametrize("model_type, reason", [
    ("jetmoe", "experts are not transformers' fused experts modules"),
    ("llama4_text", "Llama4TextExperts: not an ExpertsInterface experts class"),
])
def test_unsupported_experts_refused_under_ep(tmp_path, model_type: str, reason: str) -> None:
    AutoConfig.for_model(model_type, **_SMALL).save_pretrained(tmp_path)
    cfg = tiny_config(f"--model.path={tmp_path}", "--parallel.dp_shard=2", "--parallel.ep=2")
    assert "set parallel.ep=1" in refused_by_library(cfg, 2, reason)
    validate(tiny_config(f"--model.path={tmp_path}", "--parallel.dp_shard=2"), 2)  # the same model without EP


def test_gpt_oss_accepted_under_ep(tmp_path) -> None:
    AutoConfig.for_model("gpt_oss", **_SMALL, num_local_experts=4, num_experts_per_tok=2).save_pretrained(tmp_path)
    validate(tiny_config(f"--model.path={tmp_path}", "--parallel.dp_shard=2", "--parallel.ep=2"), 2)


@pytest.mark.parametrize("model_type, extra", [
    ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2)),
    ("olmoe", dict(num_experts=4, num_experts_per_tok=2)),
])
def test_aux_loss_accepted_under_pp(tmp_path, model_type: str, extra: dict) -> None:
    AutoConfig.for_model(model_type, **{**_SMALL, "num_hidden_layers": 4}, **extra).save_pretrained(tmp_path)
    validate(tiny_config(f"--model.path={tmp_path}", "--parallel.pp=2",
                         "--model.overrides.output_router_logits=true"), 2)


def test_aux_loss_refused_for_a_family_without_one(tmp_path) -> None:
    """AFMoE's config has a router-logit output but its forward computes no aux loss: refused on
    every layout, not a crash in the first step."""
    family_config("afmoe").save_pretrained(tmp_path)
    for layout in ([], ["--parallel.pp=2"]):
        cfg = tiny_config(f"--model.path={tmp_path}", *layout, "--model.overrides.output_router_logits=true")
        assert "set it to false" in refused_by_library(cfg, 2, "afmoe's forward returns no router aux loss")


def test_expert_fields_of_a_nested_config_are_read(tmp_path) -> None:
    """DBRX keeps its expert count, top-k and aux loss weight in `ffn_config`: under EP its experts
    are refused for their layout (not as a model without experts), and HF's aux loss is accepted
    under pp."""
    family_config("dbrx").save_pretrained(tmp_path)
    validate(tiny_config(f"--model.path={tmp_path}", "--parallel.pp=2",
                         "--model.overrides.output_router_logits=true"), 2)
    refused_by_library(tiny_config(f"--model.path={tmp_path}", "--parallel.dp_shard=2", "--parallel.ep=2"), 2,
                       "dbrx's experts are not transformers' fused experts modules")
