"""Checkpoints whose tensors transformers converts on load (a fused projection split or chunked,
a transposed router, interleaved experts, a padded LM head, per-expert tensors merged) load as
`from_pretrained` loads them, reading only a rank's rows where the operation allows it (export
writes them back: tests/test_checkpoint_export.py)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import PermuteForRope, WeightConverter

from harness.checkpoint_conversion import Conversion, WholeConversions
from harness.hf_checkpoint import HFCheckpoint
from harness.init_weights import Target
from harness.materialize import materialize
from harness.models import build_meta_model, load_config, reference_model, weight_source
from tests.families import save_random_model

# Each family's conversion mapping goes beyond merging experts: lara_mini splits its gated delta
# net's fused input projection, hrm_text chunks fused gate/up and gate/q/k/v rows, ergo stores its
# router and shared expert transposed, param2moe and sarvam_moe split a fused query_key_value
# (beside merged experts), inkling2 interleaves its experts' gate and up rows and pads its LM head.
CONVERTED = ["lara_mini", "hrm_text", "ergo", "param2moe", "sarvam_moe", "inkling2_text", "inkling2_loop_text"]
# deepseek_v4 keeps an integer tensor (its hash-routed layers' token-to-expert table), which is no
# quantized weight; falcon_h1 a buffer outside the checkpoint that its model's init computes for
# every mixer (the MuP vector).
FAMILIES = [*CONVERTED, "deepseek_v4", "falcon_h1"]


def checkpoint_keys(path) -> set[str]:
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_checkpoint_loads_as_from_pretrained(tmp_path, family):
    save_random_model(family, tmp_path)
    config = load_config(None, str(tmp_path))
    model = build_meta_model(config)
    if family in CONVERTED:  # save_pretrained writes the checkpoint layout, not the model's own names
        assert checkpoint_keys(tmp_path) - set(model.state_dict())
    source = weight_source(model, 0, str(tmp_path))
    source.check()  # what validation runs first
    materialize(model, source, "cpu")
    reference = reference_model(config, 0, str(tmp_path))
    expected = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
    loaded = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


class _ReadLog:
    """The regions an HFCheckpoint reads, per checkpoint key (None: whole)."""

    def __init__(self, checkpoint: HFCheckpoint) -> None:
        self.reads: list[tuple[str, tuple | None]] = []
        read_key = checkpoint._read_key

        def logged(key, region):
            self.reads.append((key, region))
            return read_key(key, region)

        checkpoint._read_key = logged


def _fill_rows(checkpoint: HFCheckpoint, name: str, rows: slice) -> torch.Tensor:
    """What a rank holding `rows` of `name` (an FSDP shard) receives."""
    shape = checkpoint.expected[name]
    region = (rows,) + tuple(slice(0, n) for n in shape[1:])
    local = torch.empty((rows.stop - rows.start, *shape[1:]))
    module, _, attr = name.rpartition(".")
    checkpoint.fill(module, torch.nn.Module(), {attr: Target(name, local, torch.Size(shape), region, True)})
    return local


@pytest.mark.parametrize("family, name, rows, read", [
    # in_proj's rows are [qkv | z | b | a] = [128 | 64 | 4 | 4]: z's rows 16-48 are in_proj's 144-176.
    ("lara_mini", "model.layers.0.linear_attn.in_proj_z.weight", slice(16, 48),
     ("model.layers.0.linear_attn.in_proj.weight", (slice(144, 176), slice(0, 64)))),
    # query_key_value's rows are [q | k | v] = [64 | 32 | 32]: v's rows 16-32 are its 112-128.
    ("param2moe", "model.layers.0.self_attn.v_proj.weight", slice(16, 32),
     ("model.layers.0.attention.query_key_value.weight", (slice(112, 128), slice(0, 64)))),
    # The router is stored [hidden, experts]: rows 2-4 of the model's [experts, hidden] are its columns 2-4.
    ("ergo", "model.layers.1.mlp.gate.linear.weight", slice(2, 4),
     ("layers.1.feed_forward.gate_kernel", (slice(0, 64), slice(2, 4)))),
])
def test_a_shard_reads_only_its_rows_of_a_fused_tensor(tmp_path, family, name, rows, read):
    save_random_model(family, tmp_path)
    config = load_config(None, str(tmp_path))
    checkpoint = HFCheckpoint(str(tmp_path), build_meta_model(config))
    checkpoint.check()
    log = _ReadLog(checkpoint)
    local = _fill_rows(checkpoint, name, rows)
    assert log.reads == [read]
    assert torch.equal(local, reference_model(config, 0, str(tmp_path)).state_dict()[name][rows])
    assert not checkpoint.whole_read_keys()


@pytest.mark.parametrize("family", ["inkling2_text", "inkling2_loop_text"])
def test_a_shard_of_interleaved_experts_reads_its_experts_and_the_padded_head_is_read_whole(tmp_path, family):
    """Inkling2's experts are stored [experts, gate and up rows interleaved, hidden]: a rank holding
    experts 2-4 reads those, whole along the interleaved rows (Inkling2-Loop's dequantization hands
    unquantized experts on first). The LM head is stored padded to vocab_size; the unpadding is
    Inkling2's own operation, which gets the whole tensor."""
    save_random_model(family, tmp_path)
    config = load_config(None, str(tmp_path))
    checkpoint = HFCheckpoint(str(tmp_path), build_meta_model(config))
    checkpoint.check()
    expected = reference_model(config, 0, str(tmp_path)).state_dict()
    log = _ReadLog(checkpoint)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(_fill_rows(checkpoint, name, slice(2, 4)), expected[name][2:4])
    _, rows, hidden = checkpoint.expected[name]
    assert log.reads == [("model.llm.layers.1.mlp.experts.w13_weight", (slice(2, 4), slice(0, rows), slice(0, hidden)))]
    log.reads.clear()
    assert torch.equal(_fill_rows(checkpoint, "lm_head.weight", slice(128, 256)), expected["lm_head.weight"][128:])
    assert log.reads == [("model.llm.unembed.weight", None)]
    assert "model.llm.unembed.weight" in checkpoint.whole_read_keys()
    assert not any("experts" in key for key in checkpoint.whole_read_keys())


def test_a_conversion_that_needs_its_source_whole_reads_it_once_for_all_its_targets():
    """Kimi-K2.5's vision attention: one fused wqkv, chunked into q, k and v and permuted for
    rotary per head; a rank filling all three reads wqkv once."""
    converter = next(t for t in get_checkpoint_conversion_mapping("kimi_k25")
                     if isinstance(t, WeightConverter) and any(isinstance(op, PermuteForRope) for op in t.operations))
    model = torch.nn.Module()
    model.config = SimpleNamespace(vision_config=SimpleNamespace(num_attention_heads=2))
    (pattern,) = converter.source_patterns
    conversion = Conversion(converter, {pattern: ["blocks.0.wqkv.weight"]}, "blocks.0.attn.q_proj.weight", model,
                            {"blocks.0.wqkv.weight": (24, 4)})
    assert not conversion.traced and set(conversion.outputs) == {f"blocks.0.attn.{p}_proj.weight" for p in "qkv"}
    fused = torch.randn(24, 4)
    reads = []

    def read_key(key, region):
        reads.append((key, region))
        return fused

    whole = WholeConversions()
    parts = {name: whole.read(conversion, name, (slice(0, 8), slice(0, 4)), read_key) for name in conversion.outputs}
    assert reads == [("blocks.0.wqkv.weight", None)]
    q, k, v = fused.chunk(3)
    # Rotary pairs (2i, 2i+1) of each 4-row head become rows (i, i+2).
    permuted = [x.view(2, 2, 2, 4).transpose(1, 2).reshape(8, 4) for x in (q, k)]
    assert all(torch.equal(parts[f"blocks.0.attn.{p}_proj.weight"], x) for p, x in zip("qkv", [*permuted, v]))
