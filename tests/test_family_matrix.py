"""A slice of the family matrix (tests/family_matrix.py) on every layout: families whose
forward does more than embeddings -> layers -> norm -> head (logit scales and soft-caps,
multipliers, tied embeddings, per-layer rotary, Mamba / linear-attention / convolution mixers, a
block several layers share) and MoE families with different routers and expert layouts. Each
layout is one process group for all of them. A cell passes when it matches the one-process run,
or, for the cells listed in REFUSED, when validation refuses it in one line naming the reason; the
whole matrix is `python -m tests.family_matrix` (README: Supported models)."""

from __future__ import annotations

import pytest

from tests.family_matrix import LAYOUTS, family_recipes, is_moe, run_layout

DENSE = ["cohere", "granite", "gemma2", "gemma3_text", "falcon_h1", "qwen3_next", "lfm2", "gpt2", "biogpt",
         "zamba"]
MOE = ["qwen3_moe", "gpt_oss", "olmoe", "jetmoe", "glm4_moe", "deepseek_v2", "deepseek_v4", "longcat_flash"]
TESTED_LAYOUTS = ["1 process", "pp=2, selective AC", "dp_shard=2, full AC", "ep=2, selective AC",
                  "pp=2, HF aux loss"]
# The cells validation must refuse (and why); every other cell must match the one-process run.
REFUSED = {("jetmoe", "ep=2, selective AC"): "not transformers' fused experts modules",
           ("glm4_moe", "pp=2, HF aux loss"): "forward returns no router aux loss",
           ("deepseek_v2", "pp=2, HF aux loss"): "forward returns no router aux loss",
           # Hyper-connection streams merged after the layers (hash-routed MoE layers: under ep).
           ("deepseek_v4", "pp=2, selective AC"): "parts after its layers that are not norms (hc_head)",
           ("deepseek_v4", "pp=2, HF aux loss"): "parts after its layers that are not norms (hc_head)",
           # One transformer block shared by several layers: FSDP shards it once, stages cannot split it.
           ("zamba", "pp=2, selective AC"): "share parameters",
           # Zero-computation experts in a loop of its own: under FSDP a rank may leave the real
           # experts of a layer unpicked (every parameter still gets a gradient).
           ("longcat_flash", "ep=2, selective AC"): "LongcatFlashExperts: not an ExpertsInterface experts class",
           ("longcat_flash", "pp=2, HF aux loss"): "forward returns no router aux loss"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("families"))


@pytest.mark.parametrize("layout", TESTED_LAYOUTS)
def test_families_match_single_process_or_are_refused(layout, folder):
    _, flags, moe_only = LAYOUTS[layout]
    families = [f for f in DENSE + MOE if is_moe(f) or not moe_only]
    cells = run_layout(layout, family_recipes(families, folder, flags))
    expected = {family: "refused" if (family, layout) in REFUSED else "ok" for family in families}
    assert {family: cell.split(":")[0] for family, cell in cells.items()} == expected, cells
    for (family, refused_layout), reason in REFUSED.items():
        if refused_layout == layout:
            assert reason in cells[family] and "\n" not in cells[family], cells[family]
