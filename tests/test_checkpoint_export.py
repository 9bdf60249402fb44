"""Export: a checkpoint of a sharded run becomes an HF folder that plain transformers loads and
that gives the trained model's logits (expert-parallel MoE: experts are DTensors over ep x efsdp)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from harness.checkpoint import save_checkpoint
from harness.config import Config
from harness.export import export, main as export_main
from harness.trainer import build_run, train_step
from harness.validation import validate
from multiproc import run_ranks
from reference import tiny_config


def _batch(cfg: Config) -> torch.Tensor:
    return torch.randint(0, 256, (2, cfg.train.seq_len), generator=torch.Generator().manual_seed(7))


def train_and_save(rank: int, world_size: int, cfg: Config, root: str) -> torch.Tensor:
    """Two steps, a checkpoint, and the trained model's logits on a fixed batch."""
    run = build_run(cfg, validate(cfg, world_size))
    for _ in range(2):
        train_step(run)
    save_checkpoint(run, root)
    with torch.no_grad():
        return run.modules[0](input_ids=_batch(cfg)).logits


def test_export_of_expert_parallel_run_loads_in_transformers(tmp_path):
    cfg = tiny_config("--model.preset=qwen3_moe", "--parallel.dp_shard=2", "--parallel.ep=2")
    root, out = str(tmp_path / "ckpt"), tmp_path / "hf"
    trained = run_ranks(train_and_save, 2, cfg, root)[0]
    export(root, str(out))
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.model_type == "qwen3_moe"
    with torch.no_grad():
        logits = model(input_ids=_batch(cfg)).logits
    torch.testing.assert_close(logits, trained, atol=1e-5, rtol=0)


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
