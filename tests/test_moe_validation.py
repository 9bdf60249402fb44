"""Expert-parallel refusals known from the config come from validation, before any process
starts, in one line: experts that are not transformers' fused experts modules (JetMoE keeps a
per-expert module list; Llama 4's experts are not ExpertsInterface classes)."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from harness.config import ConfigError
from harness.validation import validate
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
    with pytest.raises(ConfigError, match=reason) as error:
        validate(cfg, 2)
    assert "\n" not in str(error.value) and "set parallel.ep=1" in str(error.value)
    validate(tiny_config(f"--model.path={tmp_path}", "--parallel.dp_shard=2"), 2)  # the same model without EP


def test_gpt_oss_accepted_under_ep(tmp_path) -> None:
    AutoConfig.for_model("gpt_oss", **_SMALL, num_local_experts=4, num_experts_per_tok=2).save_pretrained(tmp_path)
    validate(tiny_config(f"--model.path={tmp_path}", "--parallel.dp_shard=2", "--parallel.ep=2"), 2)
