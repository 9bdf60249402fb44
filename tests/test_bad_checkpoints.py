"""A bad checkpoint in model.path is refused before any process starts: one line naming the
field, what is wrong and how to fix it; from the launcher, exit code 2 and no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.config import ConfigError
from harness.models import load_config, reference_model
from harness.validation import validate
from tests.reference import tiny_config

EXPERT = "model.layers.0.mlp.experts.3.gate_proj.weight"  # a Hub-layout (one tensor per expert) name
# The launcher as root would read files whatever their mode: without these capabilities, root
# is held to a file's permission bits as any user is.
_NO_PERMISSION_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                           "--inh-caps=-dac_override,-dac_read_search"]


def _bad_checkpoint(root, damage: str) -> str:
    model = reference_model(load_config("qwen3_moe", None), seed=0)
    path = root / damage.replace(" ", "_")
    if damage in ("sharded", "shards missing"):
        model.save_pretrained(path, max_shard_size="100KB")
        if damage == "shards missing":
            for name in os.listdir(path):
                if name.endswith(".safetensors"):
                    os.remove(path / name)
        return str(path)
    if damage.startswith("expert"):
        _damage_experts(model, path, damage)
        return str(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if damage == "missing":
        del state["model.layers.1.self_attn.o_proj.weight"]
    if damage == "dtype":
        state["model.norm.weight"] = state["model.norm.weight"].to(torch.int8)
    model.config.save_pretrained(path)
    save_file(state, path / "model.safetensors")
    if damage == "truncated":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[:len(data) - 1000])
    if damage == "bin only":
        os.rename(path / "model.safetensors", path / "pytorch_model.bin")
    return str(path)


def _damage_experts(model, path, damage: str) -> None:
    """A Hub-layout checkpoint (save_pretrained writes experts one tensor each) with `damage`."""
    model.save_pretrained(path)
    state = load_file(path / "model.safetensors")
    if damage == "expert missing":
        del state[EXPERT]
    if damage == "expert shape":
        state[EXPERT] = state[EXPERT][:16]
    for i in range(8):
        up = f"model.layers.0.mlp.experts.{i}.up_proj.weight"
        if damage == "experts missing":
            del state[up]
        if damage == "experts disagree":  # each consistent, gate and up not: they cannot be concatenated
            state[up] = state[up][:, :48].contiguous()
    save_file(state, path / "model.safetensors")


@pytest.mark.parametrize("damage, flags, expected", [
    ("missing", [], "missing 1 of the model's 47 tensors (first: model.layers.1.self_attn.o_proj.weight)"),
    ("dtype", [], "tensor model.norm.weight is stored as I8"),
    ("truncated", [], "model.safetensors: unreadable or truncated safetensors file"),
    ("bin only", [], "only .bin weights found"),
    ("none", ["--model.overrides.moe_intermediate_size=16"], "has shape [8, 64, 64] in the checkpoint but the config "
                                                             "gives [8, 32, 64]"),
    ("expert missing", [], "checkpoint is missing 1 of the 8 experts' tensors that make "
                           f"model.layers.0.mlp.experts.gate_up_proj (first: {EXPERT})"),
    ("expert shape", [], f"tensor {EXPERT} has shape [16, 64] in the checkpoint but the other experts' have [32, 64]"),
    ("experts missing", [], "checkpoint is missing 8 of the 8 experts' tensors that make "
                            "model.layers.0.mlp.experts.gate_up_proj (first: mlp.experts.0.up_proj.weight)"),
    ("experts disagree", [], "tensor model.layers.0.mlp.experts.gate_up_proj cannot be built from the checkpoint's "
                             "tensors (Sizes of tensors must match"),
    ("shards missing", [], "model.safetensors.index.json names 15 shard files and 15 are missing (first: "
                           "model-00001-of-00015.safetensors); copy the missing shard files"),
])
def test_bad_checkpoint_is_one_line_before_training(tmp_path, damage, flags, expected):
    path = _bad_checkpoint(tmp_path, damage)
    with pytest.raises(ConfigError) as error:
        validate(tiny_config(f"--model.path={path}", *flags), 1)
    message = str(error.value)
    assert message.startswith(f"model.path={path}: ") and expected in message and "\n" not in message


def _launch(tmp_path, path: str, *prefix: str) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "launch", f"--model.path={path}", "--parallel.dp_shard=2"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_launcher_refuses_a_bad_checkpoint_in_one_line(tmp_path):
    for damage, expected in [("expert missing", f"(first: {EXPERT})"),
                             ("shards missing", "model.safetensors.index.json names 15 shard files")]:
        path = _bad_checkpoint(tmp_path, damage)
        result = _launch(tmp_path, path)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: model.path={path}: ") and expected in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None,
                    reason="root reads any file; dropping that needs setpriv")
@pytest.mark.parametrize("damage, unreadable, mode, expected", [
    ("none", "", 0o300, "cannot list the directory (permission denied); give the user running training read "
                        "access to it"),
    ("none", "", 0o600, "cannot list the directory (permission denied)"),
    ("none", "config.json", 0o000, "config.json: not readable (permission denied)"),
    ("none", "model.safetensors", 0o000, "model.safetensors: not readable (permission denied); give the user "
                                         "running training read access to it"),
    ("sharded", "model.safetensors.index.json", 0o000, "model.safetensors.index.json: not readable (permission "
                                                      "denied)"),
], ids=["directory", "directory without search", "config", "shard", "index"])
def test_checkpoint_without_read_permission_says_so(tmp_path, damage, unreadable, mode, expected):
    path = _bad_checkpoint(tmp_path, damage)
    os.chmod(os.path.join(path, unreadable), mode)
    try:
        result = _launch(tmp_path, path, *(_NO_PERMISSION_OVERRIDE if os.geteuid() == 0 else []))
    finally:
        os.chmod(os.path.join(path, unreadable), 0o755)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: model.path={path}: ") and expected in line


def test_a_conversion_that_cannot_make_the_model_tensors_names_the_family_and_the_operation(tmp_path):
    """Lara-Mini's checkpoint fuses four projections into one in_proj, which transformers' conversion
    splits by the model's sizes: with rows cut off, the split is what fails, and says so (its parts
    are not reported missing)."""
    from tests.families import save_random_model

    save_random_model("lara_mini", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    fused = "model.layers.0.linear_attn.in_proj.weight"
    state[fused] = state[fused][:-4].contiguous()
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError) as error:
        validate(tiny_config(f"--model.path={tmp_path}"), 1)
    message = str(error.value)
    assert message.startswith(f"model.path={tmp_path}: tensor model.layers.0.linear_attn.in_proj_qkv.weight cannot be "
                              "built from the checkpoint's tensors (split_with_sizes expects split_sizes to sum "
                              "exactly to 196") and "by lara_mini's Split(dim=0) conversion" in message, message
    assert "\n" not in message
