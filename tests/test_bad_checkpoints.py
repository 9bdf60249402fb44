"""A bad checkpoint in model.path is refused before any process starts: one line naming the
field, what is wrong and how to fix it."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from harness.config import ConfigError
from harness.models import load_config, reference_model
from harness.validation import validate
from tests.reference import tiny_config


def _bad_checkpoint(root, damage: str) -> str:
    model = reference_model(load_config("qwen3_moe", None), seed=0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if damage == "missing":
        del state["model.layers.1.self_attn.o_proj.weight"]
    if damage == "dtype":
        state["model.norm.weight"] = state["model.norm.weight"].to(torch.int8)
    path = root / damage
    model.config.save_pretrained(path)
    save_file(state, path / "model.safetensors")
    if damage == "truncated":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[:len(data) - 1000])
    if damage == "bin only":
        os.rename(path / "model.safetensors", path / "pytorch_model.bin")
    return str(path)


@pytest.mark.parametrize("damage, flags, expected", [
    ("missing", [], "missing 1 of the model's 47 tensors (first: model.layers.1.self_attn.o_proj.weight)"),
    ("dtype", [], "tensor model.norm.weight is stored as I8"),
    ("truncated", [], "model.safetensors: unreadable or truncated safetensors file"),
    ("bin only", [], "only .bin weights found"),
    ("none", ["--model.overrides.moe_intermediate_size=16"], "has shape [8, 64, 64] in the checkpoint but the config "
                                                             "gives [8, 32, 64]"),
])
def test_bad_checkpoint_is_one_line_before_training(tmp_path, damage, flags, expected):
    path = _bad_checkpoint(tmp_path, damage)
    with pytest.raises(ConfigError) as error:
        validate(tiny_config(f"--model.path={path}", *flags), 1)
    message = str(error.value)
    assert message.startswith(f"model.path={path}: ") and expected in message and "\n" not in message
