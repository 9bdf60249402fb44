"""DCP checkpoints on real gloo ranks: bitwise resume, and loading into another layout."""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from harness.checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from harness.config import Config
from harness.trainer import build_run, train_step
from harness.validation import validate
from multiproc import run_ranks
from reference import tiny_config


def _full_params(run) -> dict[str, torch.Tensor]:
    params: dict[str, torch.Tensor] = {}
    for module in run.modules:
        params.update(get_model_state_dict(module, options=StateDictOptions(full_state_dict=True)))
    return params


def train_segment(rank: int, world_size: int, cfg: Config, steps: int, load: str | None,
                  save: str | None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Optionally resume from `load`, run `steps` steps, optionally checkpoint into `save`."""
    run = build_run(cfg, validate(cfg, world_size))
    if load is not None:
        load_checkpoint(run, load)
    losses = [train_step(run)["loss"] for _ in range(steps)]
    if save is not None:
        save_checkpoint(run, save)
    return losses, _full_params(run)


def load_then_step(rank: int, world_size: int, cfg: Config, path: str) -> tuple[dict[str, torch.Tensor], float]:
    """The parameters right after loading `path`, and the loss of the step that follows."""
    run = build_run(cfg, validate(cfg, world_size))
    load_checkpoint(run, path)
    params = _full_params(run)
    return params, train_step(run)["loss"]


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: differs after resume"


LAYOUTS = {
    "fsdp2": (2, ["--parallel.dp_shard=2"]),
    "pp2xfsdp2": (4, ["--parallel.pp=2", "--parallel.dp_shard=2", "--train.micro_batch_size=4"]),
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_resume_is_bitwise(tmp_path, layout):
    world_size, overrides = LAYOUTS[layout]
    cfg = tiny_config("--train.steps=4", *overrides)
    straight_losses, straight_params = run_ranks(train_segment, world_size, cfg, 4, None, None)[0]
    root = str(tmp_path / "ckpt")
    first, _ = run_ranks(train_segment, world_size, cfg, 2, None, root)[0]
    (_, path), = complete_checkpoints(root)
    assert path.endswith("step_0000002")
    second, resumed_params = run_ranks(train_segment, world_size, cfg, 2, path, None)[0]
    assert first + second == straight_losses
    _assert_bitwise(resumed_params, straight_params)


RESHARD = {
    "fsdp4-to-pp2xfsdp2": ((4, ["--parallel.dp_shard=4"]),
                           (4, ["--parallel.pp=2", "--parallel.dp_shard=2", "--train.micro_batch_size=4"])),
    "interleaved-pp2-to-fsdp2": ((2, ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=Interleaved1F1B",
                                      "--train.micro_batch_size=8"]),
                                 (2, ["--parallel.dp_shard=2"])),
}


@pytest.mark.parametrize("case", RESHARD, ids=list(RESHARD))
def test_checkpoint_loads_into_another_layout(tmp_path, case):
    (save_world, save_layout), (load_world, load_layout) = RESHARD[case]
    root = str(tmp_path / "ckpt")
    saver = tiny_config("--train.steps=4", *save_layout)
    saved_losses, saved_params = run_ranks(train_segment, save_world, saver, 2, None, root)[0]
    (_, path), = complete_checkpoints(root)
    # The saving layout's next step, against the loading layout's first step after resume.
    expected, _ = run_ranks(train_segment, save_world, saver, 1, path, None)[0]
    loader = tiny_config("--train.steps=4", *load_layout)
    loaded_params, next_loss = run_ranks(load_then_step, load_world, loader, path)[0]
    _assert_bitwise(loaded_params, saved_params)
    torch.testing.assert_close(torch.tensor(next_loss), torch.tensor(expected[0]), atol=1e-5, rtol=0)
    assert saved_losses  # the saving layout trained before saving
