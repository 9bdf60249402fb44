"""Export: a checkpoint of a sharded run becomes an HF folder (sharded safetensors + index) that
plain transformers loads and that gives the trained model's logits (expert-parallel MoE: experts
are DTensors over ep x efsdp), and that the harness loads back with `model.path`."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from harness.config import Config
from harness.export import export, main as export_main
from harness.trainer import build_run, checkpoint_run, train_step
from harness.validation import validate
from tests.families import save_random_model
from tests.family_matrix import folder_tensors
from tests.multiproc import run_ranks
from tests.reference import reference_run, tiny_config


def _batch(cfg: Config) -> torch.Tensor:
    return torch.randint(0, 256, (2, cfg.train.seq_len), generator=torch.Generator().manual_seed(7))


def train_and_save(rank: int, world_size: int, cfg: Config, root: str) -> torch.Tensor:
    """Two steps, a checkpoint, and the trained model's logits on a fixed batch."""
    run = build_run(cfg, validate(cfg, world_size))
    for _ in range(2):
        train_step(run)
    checkpoint_run(run, root)
    with torch.no_grad():
        return run.modules[0](input_ids=_batch(cfg)).logits


def load_and_step(rank: int, world_size: int, cfg: Config) -> tuple[torch.Tensor, float]:
    """The logits of a run loaded from `model.path` on the fixed batch, and its first loss."""
    run = build_run(cfg, validate(cfg, world_size))
    with torch.no_grad():
        logits = run.modules[0](input_ids=_batch(cfg)).logits
    return logits, train_step(run)["loss"]


def test_streaming_export_round_trips_through_transformers_and_model_path(tmp_path):
    cfg = tiny_config("--model.preset=qwen3_moe", "--parallel.dp_shard=2", "--parallel.ep=2")
    root, out = str(tmp_path / "ckpt"), tmp_path / "hf"
    trained = run_ranks(train_and_save, 2, cfg, root)[0]
    export(root, str(out), max_shard_bytes=100_000)
    with open(out / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    files = {p.name for p in out.iterdir() if p.suffix == ".safetensors"}
    assert len(files) > 1 and set(weight_map.values()) == files
    # The Hub layout save_pretrained writes: one tensor per expert.
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in weight_map
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.model_type == "qwen3_moe"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_batch(cfg)).logits, trained, atol=1e-5, rtol=0)
    # Loaded back by the harness in another layout (experts FSDP-sharded, no EP): same logits,
    # and the same first loss as the one-process run from transformers' own load.
    again = tiny_config(f"--model.path={out}", "--parallel.dp_shard=2", "--train.steps=1")
    logits, loss = run_ranks(load_and_step, 2, again)[0]
    torch.testing.assert_close(logits, trained, atol=1e-5, rtol=0)
    assert abs(loss - reference_run(again)[0][0]) < 1e-5


def test_export_refuses_a_non_empty_output_and_a_missing_checkpoint(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert export_main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert export_main([str(tmp_path), str(tmp_path / "out" / "keep.txt")]) == 2
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert export_main([str(tmp_path / "empty"), str(tmp_path / "new")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)


def _checkpoint_as_loaded(rank: int, world_size: int, cfg: Config, root: str) -> None:
    checkpoint_run(build_run(cfg, validate(cfg, world_size)), root)


@pytest.mark.parametrize("family", ["lara_mini", "param2moe", "inkling2_text", "ergo"])
def test_export_writes_what_save_pretrained_writes(tmp_path, family):
    """A checkpoint of a run loaded from save_pretrained's output, exported before any step, is that
    output again, key for key and value for value, through transformers' reversed conversions:
    in_proj_qkv / z / b / a joined back into Lara-Mini's in_proj, q / k / v into query_key_value
    beside experts one tensor each, Inkling2's gate and up rows interleaved again and its LM head
    padded back, Ergo's router and shared expert transposed back under its own names. Every
    tensor gets a file of its own unless the reverted conversion needs it with others."""
    hub, root, out = tmp_path / "hub", str(tmp_path / "checkpoints"), tmp_path / "hf"
    save_random_model(family, str(hub))
    run_ranks(_checkpoint_as_loaded, 1, tiny_config(f"--model.path={hub}"), root)
    export(root, str(out), max_shard_bytes=1)
    expected, exported = folder_tensors(str(hub)), folder_tensors(str(out))
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], v) for k, v in expected.items()), \
        [k for k, v in expected.items() if not torch.equal(exported[k], v)]
