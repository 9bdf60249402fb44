"""DCP checkpoints on real gloo ranks: bitwise resume, and loading into another layout."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from harness.checkpoint import complete_checkpoints
from harness.config import Config
from harness.trainer import Run, build_run, checkpoint_run, resume_run, train_step
from harness.validation import validate
from tests.multiproc import run_ranks
from tests.reference import tiny_config


def _full_params(run: Run) -> dict[str, torch.Tensor]:
    params: dict[str, torch.Tensor] = {}
    for module in run.modules:
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
        # Cloned: on a one-rank mesh the "full" tensors are the parameters themselves, which
        # later steps would change in place.
        params.update({name: value.detach().clone() for name, value in full.items()})
    return params


def train_segment(rank: int, world_size: int, cfg: Config, steps: int, load: str | None, save: str | None,
                  then: int = 0) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Optionally resume from `load`, run `steps` steps, optionally checkpoint into `save`, run
    `then` more steps. Returns every loss, and the parameters as they were after `steps`."""
    run = build_run(cfg, validate(cfg, world_size))
    if load is not None:
        resume_run(run, load)
    losses = [train_step(run)["loss"] for _ in range(steps)]
    if save is not None:
        checkpoint_run(run, save)
    params = _full_params(run)
    losses += [train_step(run)["loss"] for _ in range(then)]
    return losses, params


def load_then_step(rank: int, world_size: int, cfg: Config, path: str) -> tuple[dict[str, torch.Tensor], float]:
    """The parameters right after loading `path`, and the loss of the step that follows."""
    run = build_run(cfg, validate(cfg, world_size))
    resume_run(run, path)
    params = _full_params(run)
    return params, train_step(run)["loss"]


def _gathered(results: list[tuple]) -> tuple:
    """Rank 0's losses and the union of every rank's parameters (pipeline ranks hold parts)."""
    params: dict[str, torch.Tensor] = {}
    for result in results:
        params.update(result[1])
    return results[0][0], params


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
    straight_losses, straight_params = _gathered(run_ranks(train_segment, world_size, cfg, 4, None, None))
    root = str(tmp_path / "ckpt")
    first, _ = run_ranks(train_segment, world_size, cfg, 2, None, root)[0]
    (_, path), = complete_checkpoints(root)
    assert path.endswith("step_0000002")
    second, resumed_params = _gathered(run_ranks(train_segment, world_size, cfg, 2, path, None))
    assert first + second == straight_losses
    _assert_bitwise(resumed_params, straight_params)


RESHARD = {
    "fsdp4-to-pp2xfsdp2": ((4, ["--parallel.dp_shard=4"]),
                           (4, ["--parallel.pp=2", "--parallel.dp_shard=2", "--train.micro_batch_size=4"])),
    # Two stages per rank (one optimizer over both) into one process: another world size.
    "interleaved-pp2-to-1rank": ((2, ["--parallel.pp=2", "--parallel.dp_shard=1",
                                      "--parallel.pp_schedule=Interleaved1F1B", "--train.micro_batch_size=8"]),
                                 (1, ["--parallel.dp_shard=1", "--train.micro_batch_size=8"])),
}


@pytest.mark.parametrize("case", RESHARD, ids=list(RESHARD))
def test_checkpoint_loads_into_another_layout(tmp_path, case):
    (save_world, save_layout), (load_world, load_layout) = RESHARD[case]
    root = str(tmp_path / "ckpt")
    saver = tiny_config("--train.steps=4", *save_layout)
    # The saving layout's step after the checkpoint, against the loading layout's.
    saved_losses, saved_params = _gathered(run_ranks(train_segment, save_world, saver, 2, None, root, 1))
    (_, path), = complete_checkpoints(root)
    loader = tiny_config("--train.steps=4", *load_layout)
    next_loss, loaded_params = _gathered([(loss, params) for params, loss in
                                          run_ranks(load_then_step, load_world, loader, path)])
    _assert_bitwise(loaded_params, saved_params)
    torch.testing.assert_close(torch.tensor(next_loss), torch.tensor(saved_losses[2]), atol=1e-5, rtol=0)
