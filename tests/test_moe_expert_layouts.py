"""The EP experts forward (`moe.experts.local_experts_forward`) against each family's own eager
experts forward, for every expert layout transformers' ExpertsInterface describes: gated
[E, 2I, H] (Qwen3-MoE), transposed (Aria), transposed + biased + interleaved clamped SwiGLU
(GPT-OSS), ungated up_proj + activation (Nemotron-H), post-expert norm (MuseSpark)."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import AutoConfig

from moe.experts import expert_param_names, local_experts_forward
from moe.routing import Routed, dense_routing

_SMALL = dict(hidden_size=32, intermediate_size=16, moe_intermediate_size=16, moe_hidden_size=32, moe_num_experts=4,
              num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_topk=2)

# family: (model_type, experts class, config fields, (has_gate, is_transposed, has_bias, has_post_expert_norm))
LAYOUTS = {
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeExperts", {}, (True, False, False, False)),
    "aria": ("aria", "AriaExperts", {}, (True, True, False, False)),
    "gpt_oss": ("gpt_oss", "GptOssExperts", dict(swiglu_limit=0.5), (True, True, True, False)),
    "nemotron_h": ("nemotron_h", "NemotronHExperts", dict(moe_latent_size=None), (False, False, False, False)),
    "muse_spark": ("muse_spark", "MuseSparkExperts", {}, (True, False, False, True)),
}


def _experts(model_type: str, class_name: str, extra: dict) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **_SMALL, **extra)
    config = config.get_text_config()
    for key, value in {**_SMALL, **extra}.items():
        setattr(config, key, value)  # composite configs pass some fields to their sub-configs only
    config._experts_implementation = "eager"
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    experts = getattr(module, class_name)(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return experts


@pytest.mark.parametrize("family", LAYOUTS)
def test_local_experts_forward_matches_the_family_forward(family: str) -> None:
    model_type, class_name, extra, layout = LAYOUTS[family]
    experts = _experts(model_type, class_name, extra)
    assert (experts.has_gate, experts.is_transposed, experts.has_bias, experts.has_post_expert_norm) == layout
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(10, experts.down_proj.shape[2 if experts.is_transposed else 1], generator=generator)
    scores = torch.randn(10, experts.num_experts, generator=generator)
    weights, ids = scores.softmax(-1).topk(2, dim=-1)
    expected = experts(x, ids, weights)
    routing_map, dense = dense_routing(ids, weights, experts.num_experts)
    mine = local_experts_forward(experts, Routed(x, routing_map, dense))
    torch.testing.assert_close(mine, expected, atol=1e-5, rtol=1e-5)
    assert len(expert_param_names(experts)) == (4 if experts.has_bias else 2)
