"""A slice of the family matrix (tests/family_matrix.py) on every layout: families whose
forward does more than embeddings -> layers -> norm -> head (logit scales and soft-caps,
multipliers, tied embeddings, per-layer rotary, Mamba / linear-attention / convolution mixers, a
block several layers share) and MoE families with different routers and expert layouts; and on
the "load, ..." layouts, families whose checkpoints transformers converts beyond merging experts
(LOADED), from their save_pretrained checkpoints, exported back; on the tensor-parallel layout,
families whose plans use each style tensor parallel honours (TENSOR_PARALLEL). Each layout is one
process group for all of them. A cell passes when it matches the one-process run,
or, for the cells listed in REFUSED (and in LIBRARY_REFUSED on the transformers version it names),
when validation refuses it in one line naming the reason; the whole matrix is `python -m tests.family_matrix` (docs/family-matrix.md)."""

from __future__ import annotations

import pytest
import transformers

from tests.family_matrix import LAYOUTS, LOAD_LAYOUTS, family_recipes, is_moe, run_layout
from tests.library_refusals import LIBRARY_VERSION

DENSE = ["cohere", "granite", "gemma2", "gemma3_text", "falcon_h1", "qwen3_next", "lfm2", "gpt2", "biogpt",
         "zamba"]
MOE = ["qwen3_moe", "gpt_oss", "olmoe", "jetmoe", "glm4_moe", "deepseek_v2", "deepseek_v4", "longcat_flash"]
# A fused projection split (Lara-Mini's in_proj; Param2MoE's query_key_value, beside experts one
# tensor each), experts' gate and up rows interleaved and an LM head stored padded (Inkling2).
LOADED = ["lara_mini", "param2moe", "inkling2_text"]
# Each style of the families' TP plans that tensor parallel honours: colwise / rowwise and
# replicated_with_grad_allreduce (Gemma 3: soft-capped, tied), colwise_gather_output and
# rowwise_split_input (OLMo 2's norms over all heads, Phi-3's fused qkv and gate_up), a gathered
# block with no row-parallel output (Qwen3.5's linear attention), embedding_rowwise (GPT-NeoX's
# embed_in), mla_kv_a_proj (MiniCPM3: scaled embeddings, residuals and logits, tied),
# local_params with sharded sinks (GraniteSWA), and DeepSeek-V3's MoE layers (on each rank's
# sequence slice, replicated).
TENSOR_PARALLEL = ["gemma3_text", "olmo2", "phi3", "qwen3_5_text", "gpt_neox", "minicpm3", "granite_swa", "deepseek_v3"]
TP_LAYOUT = "tp=2, selective AC"
TESTED_LAYOUTS = ["1 process", "pp=2, selective AC", "dp_shard=2, full AC", "ep=2, selective AC",
                  "pp=2, HF aux loss", TP_LAYOUT, *LOAD_LAYOUTS]
# The cells validation must refuse (and why) whatever transformers is installed: the harness's own limits.
REFUSED = {# Hyper-connection streams merged after the layers (hash-routed MoE layers: under ep).
           ("deepseek_v4", "pp=2, selective AC"): "parts after its layers that are not norms (hc_head)",
           ("deepseek_v4", "pp=2, HF aux loss"): "parts after its layers that are not norms (hc_head)",
           # One transformer block shared by several layers: FSDP shards it once, stages cannot split it.
           ("zamba", "pp=2, selective AC"): "share parameters",
           # Each layer returns a tuple its forward unpacks.
           ("inkling2_text", "load, pp=2"): "unpacks each layer's output"}
# Cells refused for what transformers lacks (its modelling code, not ours): tests/library_refusals.py.
LIBRARY_REFUSED = {("jetmoe", "ep=2, selective AC"): "not transformers' fused experts modules",
                   ("glm4_moe", "pp=2, HF aux loss"): "forward returns no router aux loss",
                   ("deepseek_v2", "pp=2, HF aux loss"): "forward returns no router aux loss",
                   ("longcat_flash", "pp=2, HF aux loss"): "forward returns no router aux loss"}


def expected_cells(families: list[str], layout: str, library_version: str) -> dict[str, set[str]]:
    """The outcomes each family's cell may have under `layout` with transformers `library_version`:
    a library refusal on another version than LIBRARY_VERSION may have been lifted."""
    expected = {}
    for family in families:
        if (family, layout) in REFUSED:
            expected[family] = {"refused"}
        elif (family, layout) in LIBRARY_REFUSED:
            expected[family] = {"refused"} if library_version == LIBRARY_VERSION else {"refused", "ok"}
        else:
            expected[family] = {"ok"}
    return expected


def test_library_refusals_hold_only_for_their_version() -> None:
    cell = ("longcat_flash", "pp=2, HF aux loss")
    assert expected_cells(["longcat_flash"], cell[1], LIBRARY_VERSION) == {"longcat_flash": {"refused"}}
    assert expected_cells(["longcat_flash"], cell[1], "99.0.0") == {"longcat_flash": {"refused", "ok"}}
    assert expected_cells(["zamba"], "pp=2, selective AC", "99.0.0") == {"zamba": {"refused"}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("families"))


@pytest.mark.parametrize("layout", TESTED_LAYOUTS)
def test_families_match_single_process_or_are_refused(layout, folder):
    _, flags, moe_only = LAYOUTS[layout]
    chosen = LOADED if layout in LOAD_LAYOUTS else TENSOR_PARALLEL if layout == TP_LAYOUT else DENSE + MOE
    families = [f for f in chosen if is_moe(f) or not moe_only]
    cells = run_layout(layout, family_recipes(families, folder, flags, layout in LOAD_LAYOUTS))
    expected = expected_cells(families, layout, transformers.__version__)
    unexpected = {family: cell for family, cell in cells.items() if cell.split(":")[0] not in expected[family]}
    assert not unexpected, unexpected
    for family, cell in cells.items():
        reason = REFUSED.get((family, layout)) or LIBRARY_REFUSED.get((family, layout))
        if cell.startswith("refused"):
            assert reason in cell and "\n" not in cell, cell
