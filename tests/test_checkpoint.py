"""DCP checkpoints on real gloo ranks: bitwise resume, loading into another layout, and a block
several layers share (Zamba) staying one parameter through training, resume and HF export."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM

from harness.checkpoint import complete_checkpoints
from harness.config import Config
from harness.export import export
from harness.trainer import Run, build_run, checkpoint_run, resume_run, train_step
from harness.validation import validate
from tests.families import tiny_config as family_config
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
    # Tensor-parallel shards (2-D DTensors of weights and Adam's moments) into FSDP2's, and back.
    "tp2-to-fsdp2": ((2, ["--parallel.tp=2", "--parallel.dp_shard=1"]), (2, ["--parallel.dp_shard=2"])),
    "fsdp2-to-tp2": ((2, ["--parallel.dp_shard=2"]), (2, ["--parallel.tp=2", "--parallel.dp_shard=1"])),
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


def _shared_names(model: nn.Module) -> set[tuple[str, ...]]:
    """The names of each parameter that is reachable under more than one (a tied block)."""
    names = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names[id(param)].append(name)
    return {tuple(group) for group in names.values() if len(group) > 1}


def save_and_resume_shared(rank: int, world_size: int, cfg: Config, root: str) -> tuple:
    """2 steps, a checkpoint, 2 more; then a fresh run resumed from it, 2 steps. Losses, full
    parameters after the checkpoint and at the end, and the tied names of both trained models."""
    run = build_run(cfg, validate(cfg, world_size))
    losses = [train_step(run)["loss"] for _ in range(2)]
    path = checkpoint_run(run, root)
    saved = _full_params(run)
    losses += [train_step(run)["loss"] for _ in range(2)]
    resumed = build_run(cfg, validate(cfg, world_size))
    resume_run(resumed, path)
    resumed_losses = [train_step(resumed)["loss"] for _ in range(2)]
    return (losses, resumed_losses, saved, _full_params(run), _full_params(resumed),
            _shared_names(run.modules[0]), _shared_names(resumed.modules[0]), path)


@pytest.mark.parametrize("world_size", [1, 2], ids=["1rank", "fsdp2"])
def test_shared_block_stays_tied_through_training_resume_and_export(tmp_path, world_size):
    """Zamba's one transformer block, called from two layers: FSDP shards it once, so training,
    a bitwise resume and the HF export all keep one tensor under both layers' names."""
    family_config("zamba").save_pretrained(tmp_path / "zamba")
    cfg = tiny_config(f"--model.path={tmp_path}/zamba/config.json", f"--run.dir={tmp_path}/run",
                      f"--parallel.dp_shard={world_size}", "--train.steps=4")
    losses, resumed_losses, saved, straight, resumed, tied, tied_resumed, path = run_ranks(
        save_and_resume_shared, world_size, cfg, str(tmp_path / "ckpt"))[0]
    assert resumed_losses == losses[2:]
    _assert_bitwise(resumed, straight)
    # The block's 9 tensors under layers 1 and 3 (and the tied embeddings): one parameter each.
    blocks = [names for names in tied if "shared_transf" in names[0]]
    assert len(blocks) == 9 and all(len(names) == 2 for names in blocks), tied
    assert tied_resumed == tied
    for names in tied:  # full state dicts read a parameter per name: a second copy would drift apart
        assert all(torch.equal(straight[names[0]], straight[n]) for n in names[1:]), names
    export(path, str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert _shared_names(model) == tied
    _assert_bitwise(model.state_dict(), saved)
