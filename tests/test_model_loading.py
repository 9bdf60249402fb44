"""Weights without a full copy: every rank fills only its shards, from a fresh seeded init or
from a local safetensors checkpoint read in slices, and every layout gets exactly the weights
of the one-process reference (HF's `from_pretrained` for a checkpoint)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from harness.config import ConfigError
from harness.materialize import canonical_name
from harness.models import load_config, reference_model
from harness.trainer import build_run
from harness.validation import validate
from tests.multiproc import run_ranks
from tests.reference import tiny_config

WORLD = 4
# Expert parallel with experts FSDP-sharded over the rest (efsdp=2), and pipeline x FSDP x EP.
FSDP_EP = ["--parallel.dp_shard=4", "--parallel.ep=2"]
PP_FSDP_EP = ["--parallel.pp=2", "--parallel.dp_shard=2", "--parallel.ep=2"]


def _rank_weights(cfg) -> dict[str, torch.Tensor]:
    """The full tensors of this rank's model or pipeline stages, by canonical name."""
    run = build_run(cfg, validate(cfg, WORLD))
    weights = {}
    for module in run.modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            weights[canonical_name(name)] = full.detach().clone()
    return weights


def _compare_layouts(rank: int, world_size: int, cases: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Per case, the names this rank checked bitwise against the reference."""
    checked = []
    for preset, flags in cases:
        cfg = tiny_config(f"--model.preset={preset}" if not preset.startswith("/") else f"--model.path={preset}",
                          *flags)
        path = cfg.model.path
        expected = reference_model(load_config(cfg.model.preset, path, cfg.model.overrides), cfg.train.seed, path)
        reference = {**dict(expected.named_parameters()), **dict(expected.named_buffers())}
        weights = _rank_weights(cfg)
        for name, tensor in weights.items():
            assert tensor.dtype == reference[name].dtype and torch.equal(tensor, reference[name]), \
                f"{preset} {flags}: {name} differs from the reference"
        checked.append(sorted(weights))
    return checked


def _assert_all_checked(per_rank: list[list[list[str]]], cases: list[tuple[str, list[str]]]) -> None:
    for i, (preset, flags) in enumerate(cases):
        path = preset if preset.startswith("/") else None
        model = reference_model(load_config(None if path else preset, path), 0, path)
        every = {*dict(model.named_parameters()), *dict(model.named_buffers())}
        assert set().union(*(checked[i] for checked in per_rank)) == every, (preset, flags)


def test_fresh_init_is_the_reference_on_every_layout(tmp_path):
    # CTRL's head has a bias next to its tied weight: initialising the head must not draw into the
    # embedding its first owner filled (each FSDP shard would draw from another stream).
    # FalconMamba's mixer init writes its sub-modules' tensors, which are FSDP shards there.
    from tests.families import tiny_config as family_config

    for family in ("ctrl", "falcon_mamba"):
        family_config(family).save_pretrained(tmp_path / family)
    cases = [("qwen3_moe", FSDP_EP), ("deepseek_v3", PP_FSDP_EP), ("llama", ["--parallel.dp_shard=4"]),
             (str(tmp_path / "ctrl"), ["--parallel.dp_shard=4"]), (str(tmp_path / "falcon_mamba"), ["--parallel.dp_shard=4"])]
    _assert_all_checked(run_ranks(_compare_layouts, WORLD, cases), cases)


def test_fresh_init_computes_buffers_as_transformers_does():
    """Falcon-H1's MuP vector is a buffer outside the state dict that its model's init writes into
    every mixer, not the mixer's own init: a fresh init (and a checkpoint's load) gives it the value
    transformers computes, not zeros that multiply the mixers' projections away."""
    from transformers import AutoModelForCausalLM

    from tests.families import tiny_config as family_config

    config = family_config("falcon_h1")
    expected = dict(AutoModelForCausalLM.from_config(config).named_buffers())
    buffers = dict(reference_model(config, seed=0).named_buffers())
    assert buffers.keys() == expected.keys() and "model.layers.0.mamba.mup_vector" in buffers
    assert all(torch.equal(buffers[name], value) for name, value in expected.items())


def _write_checkpoints(root) -> dict[str, str]:
    """Hub layout (save_pretrained: experts one tensor each), sharded with an index, in fp32 and
    (as Hub checkpoints usually are) bf16; and the fused transformers-5 layout in one file."""
    dirs = {}
    for preset in ("qwen3_moe", "mixtral", "deepseek_v3"):
        model = reference_model(load_config(preset, None), seed=11)
        dirs[preset] = str(root / f"{preset}_hub")
        model.save_pretrained(dirs[preset], max_shard_size="100KB")
        if preset == "qwen3_moe":
            dirs["bf16"] = str(root / "qwen3_moe_bf16")
            model.to(torch.bfloat16).save_pretrained(dirs["bf16"])
    fused = reference_model(load_config("qwen3_moe", None), seed=12)
    dirs["fused"] = str(root / "qwen3_moe_fused")
    fused.config.save_pretrained(dirs["fused"])
    save_file({k: v.contiguous() for k, v in fused.state_dict().items()}, os.path.join(dirs["fused"], "model.safetensors"))
    return dirs


def test_sharded_load_is_from_pretrained_for_both_expert_layouts(tmp_path):
    dirs = _write_checkpoints(tmp_path)
    with open(os.path.join(dirs["qwen3_moe"], "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    cases = [(dirs["qwen3_moe"], FSDP_EP), (dirs["qwen3_moe"], PP_FSDP_EP), (dirs["fused"], ["--parallel.dp_shard=4",
             "--parallel.ep=4"]), (dirs["mixtral"], FSDP_EP), (dirs["deepseek_v3"], PP_FSDP_EP), (dirs["bf16"], FSDP_EP)]
    _assert_all_checked(run_ranks(_compare_layouts, WORLD, cases), cases)


def _weights_lines(rank: int, world_size: int, paths: list[str | None]) -> list[str]:
    from harness.summary import startup_summary

    lines = []
    for path in paths:
        cfg = tiny_config(f"--model.path={path}" if path else "--model.preset=qwen3_moe", "--train.seed=7")
        model_config = load_config(cfg.model.preset, path)
        summary = startup_summary(cfg, validate(cfg, 1), model_config, "Qwen3MoeForCausalLM", 0, [], 0, None)
        lines += [line for line in summary if line.startswith("weights:")]
    return lines


def test_summary_says_where_the_weights_come_from(tmp_path):
    model = reference_model(load_config("qwen3_moe", None), seed=0)
    model.save_pretrained(tmp_path / "hub")  # experts one tensor each: 39 + 4 layers x 3 x 8
    model.config.save_pretrained(tmp_path / "config_only")
    paths = [str(tmp_path / "hub"), str(tmp_path / "config_only"), None]
    assert run_ranks(_weights_lines, 1, paths)[0] == [f"weights: {paths[0]}, 135 of its 135 tensors read",
                                                      "weights: fresh init, seed 7", "weights: fresh init, seed 7"]


def _write_config(path, kind: str) -> None:
    """A config.json the harness cannot train (what a user may point model.path at)."""
    from transformers import AutoConfig

    path.mkdir()
    if kind in ("t5", "gemma4_unified_assistant"):
        AutoConfig.for_model(kind).save_pretrained(path)
    else:
        fields = {"bad types": {"hidden_size": "abc"}, "no layers": {"num_hidden_layers": 0}}[kind]
        (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "vocab_size": 256,
                                                      "num_attention_heads": 4, "intermediate_size": 64, **fields}))


@pytest.mark.parametrize("kind, expected", [
    ("t5", "t5 has no causal-LM class in transformers (AutoModelForCausalLM); give a decoder-only language model's"),
    # Not a multimodal model: it reads the target model's hidden states, so its text config alone is no model.
    ("gemma4_unified_assistant", "gemma4_unified_assistant builds Gemma4UnifiedAssistantForCausalLM, not a language "
                                 "model of its own (its config has no vocab_size); give a decoder-only"),
    ("bad types", "cannot load its config (TypeError: Field 'hidden_size' expected int, got str (value: 'abc')); "
                  "fix its config.json"),
    ("no layers", "num_hidden_layers=0: must be > 0"),
])
def test_config_the_harness_cannot_train_is_one_line(tmp_path, kind, expected):
    path = tmp_path / kind.replace(" ", "_")
    _write_config(path, kind)
    with pytest.raises(ConfigError) as error:
        validate(tiny_config(f"--model.path={path}"), 1)
    message = str(error.value)
    assert message.startswith(f"model.path={path}: ") and expected in message and "\n" not in message


@pytest.mark.parametrize("kind, text", [("gemma3", "gemma3_text"), ("llava", "llama"), ("mistral3", "mistral")])
def test_multimodal_config_is_its_language_model(tmp_path, kind, text):
    """Wrappers whose causal-LM class is the multimodal model (gemma3) or that have none (llava,
    mistral3) train their text config's causal LM."""
    from transformers import AutoConfig

    AutoConfig.for_model(kind).save_pretrained(tmp_path)
    assert load_config(None, str(tmp_path)).model_type == text


def test_multimodal_checkpoint_trains_its_language_model(tmp_path):
    """A Qwen3.5-MoE image-text checkpoint (`model.language_model.*` keys, a vision tower):
    AutoModelForCausalLM builds its text model, so the run does too, sized and overridden by the
    text config, loaded from the checkpoint's language-model tensors."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from tests.families import tiny_config as family_config
    from tests.family_matrix import compare
    from tests.layout_run import train_layout
    from tests.reference import reference_run

    text = family_config("qwen3_5_moe_text")
    vision = AutoConfig.for_model("qwen3_5_moe").vision_config.to_dict()
    vision.update(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=text.hidden_size)
    config = AutoConfig.for_model("qwen3_5_moe", text_config=text.to_dict(), vision_config=vision)
    AutoModelForImageTextToText.from_config(config).save_pretrained(tmp_path)
    assert type(load_config(None, str(tmp_path))) is type(text)
    cfg = tiny_config(f"--model.path={tmp_path}", "--parallel.pp=2", "--parallel.pp_microbatches=2",
                      "--model.overrides.output_router_logits=true")
    assert compare(run_ranks(train_layout, 2, cfg)[0], reference_run(cfg)) == "ok"


_SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, image_size=28, patch_size=14)


@pytest.mark.parametrize("kind, text, fields, layout, flags", [
    # Tied head (the checkpoint has none); save_pretrained writes the older layout:
    # language_model.model.*, beside the vision tower and the projector.
    ("gemma3", "gemma3_text", dict(mm_tokens_per_image=4), "save_pretrained", ["--parallel.dp_shard=2"]),
    # Untied head; the layout the model holds: model.language_model.*, lm_head at the root.
    ("llava", "llama", {}, "state_dict", ["--parallel.pp=2", "--parallel.pp_microbatches=2"]),
])
def test_image_text_checkpoint_trains_its_text_model(tmp_path, kind, text, fields, layout, flags):
    """A multimodal checkpoint whose causal-LM class is the multimodal model (gemma3) or that has
    none (llava) trains its text model's causal LM: loaded bitwise equal to the multimodal
    model's language model and head, trained like the one-process reference on 2 ranks, and
    exported as the text model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from harness.export import export
    from harness.materialize import materialize
    from harness.models import build_meta_model, weight_source
    from tests.families import tiny_config as family_config
    from tests.family_matrix import compare
    from tests.layout_run import train_layout
    from tests.reference import reference_run

    path = tmp_path / kind
    config = AutoConfig.for_model(kind, text_config=family_config(text).to_dict(), vision_config=_SIGLIP, **fields)
    multimodal = AutoModelForImageTextToText.from_config(config)
    if layout == "save_pretrained":
        multimodal.save_pretrained(path)
    else:
        config.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in multimodal.state_dict().items()}, path / "model.safetensors")
    expected = {**{f"model.{k}": v for k, v in multimodal.model.language_model.state_dict().items()},
                "lm_head.weight": multimodal.lm_head.weight}
    text_config = load_config(None, str(path))
    assert text_config.model_type == text and text_config.tie_word_embeddings == config.tie_word_embeddings
    harness = build_meta_model(text_config)
    materialize(harness, weight_source(harness, 0, str(path)), "cpu")
    for model in (harness, reference_model(text_config, 0, str(path))):
        state = model.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())

    cfg = tiny_config(f"--model.path={path}", *flags)
    root = str(tmp_path / "checkpoints")
    assert compare(run_ranks(train_layout, 2, cfg, root)[0], reference_run(cfg)) == "ok"
    export(root, str(tmp_path / "hf"))
    exported, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True,
                                                          output_loading_info=True)
    assert exported.config.model_type == text and not any(info.values()), info
