"""Save and resume a training run with torch.distributed.checkpoint (DCP).

On disk, `<dir>/step_0000040/` holds DCP's files (`.metadata` and one `.distcp` per rank), each
rank's RNG state (`rng_00003.pt`) and the HF model config (`config.json`, for export). A
checkpoint is written into `step_0000040.tmp` and rank 0 renames it once every rank has
finished, so a folder named `step_XXXXXXX` is always complete: a crash mid-save leaves only a
`.tmp` folder, which resume ignores and the next save removes.

What is saved is a mapping of DCP `Stateful` objects (`training_state`): the model parts, the
optimizer, the LR scheduler and a `TrainState`. Model and optimizer go through DCP's
`get_*_state_dict` / `set_*_state_dict` with canonical parameter names (wrappers stripped,
pipeline stages named as in the whole model) and DTensor shards, so a checkpoint saved by one
layout (FSDP, HSDP, pipeline stages, expert parallel) loads into any other. The data position
is the step: the sampler derives every batch from it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

from harness.config import CheckpointConfig

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{7})$")
_TMP_SUFFIX = ".tmp"
_OLD_SUFFIX = ".old"
# Per-parameter optimizer keys: a nested param_groups list would carry each rank's own list of
# parameter names under one key, and DCP keeps only one rank's copy of such a value.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name))
             for name in os.listdir(root) if (m := _NAME.match(name)) and os.path.isdir(os.path.join(root, name))]
    return sorted(found)


@dataclass(frozen=True)
class StartPoint:
    path: str
    weights_only: bool  # take the model weights only: a fine-tune starting at step 0


def start_point(cfg: CheckpointConfig, checkpoint_dir: str) -> StartPoint | None:
    """The checkpoint a run starts from: `resume_from`, else the newest complete one in
    `checkpoint_dir`. With `load_weights_only` the run's own newest checkpoint wins once there
    is one, so a fine-tune that was interrupted resumes itself rather than starting over."""
    found = complete_checkpoints(checkpoint_dir)
    if cfg.resume_from is not None and not (cfg.load_weights_only and found):
        return StartPoint(cfg.resume_from, cfg.load_weights_only)
    return StartPoint(found[-1][1], False) if found else None


def checkpoint_step(path: str) -> int | None:
    """The step a checkpoint folder's name says it was saved at."""
    match = _NAME.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def finished_line(path: str, reached: int | None, steps: int, checkpoint_dir: str) -> str | None:
    """What to say when the checkpoint a run resumes (at step `reached`) already made `steps`."""
    if reached is None or reached < steps:
        return None
    return (f"{path} already reached train.steps={steps}: nothing to train (raise train.steps, "
            f"or delete {checkpoint_dir} to start over)")


def check_checkpoint(path: str) -> None:
    """Raises ValueError (what is wrong, one line) unless `path` holds a readable DCP checkpoint
    whose data files are all present and long enough for what its metadata says they hold."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise ValueError("no .metadata file (not a finished checkpoint)")
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # a damaged pickle raises anything from EOFError to UnpicklingError
        raise ValueError(f"unreadable .metadata ({type(e).__name__})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ValueError(f"data file {name} is missing")
        if os.path.getsize(file) < size:
            raise ValueError(f"data file {name} is truncated ({os.path.getsize(file)} of {size} bytes)")


def is_due(every: int | None, step: int, total_steps: int) -> bool:
    """Every `every` steps and at the end of training."""
    return step == total_steps or (every is not None and step % every == 0)


def as_one_module(modules: list[nn.Module]) -> nn.Module:
    """The run's modules as one tree with canonical names.

    Pipeline stages on one rank are pruned copies of the whole model (`model.layers.2` in one,
    `model.layers.5` in another), sharing one optimizer; get_state_dict needs one module that
    holds all of that optimizer's parameters. Children present in several stages are merged;
    children present in one are linked, not copied.
    """
    if len(modules) == 1:
        return modules[0]
    root = nn.Module()
    for module in modules:
        _graft(root, module)
    return root


def _graft(target: nn.Module, source: nn.Module) -> None:
    for name, child in source.named_children():
        existing = target._modules.get(name)
        if existing is None or existing is child or not _holds_state(existing):
            target._modules[name] = child
        elif _holds_state(child):
            # Both stages have it (`model`, `model.layers`): a container; merge their children.
            assert not _direct_state(existing) and not _direct_state(child), f"{name}: held by two stages"
            merged = nn.Module()
            _graft(merged, existing)
            _graft(merged, child)
            target._modules[name] = merged
        # else: a stateless duplicate (rotary tables are non-persistent buffers) keeps the first copy.


def _direct_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        n not in module._non_persistent_buffers_set for n, _ in module.named_buffers(recurse=False))


def _holds_state(module: nn.Module) -> bool:
    return any(_direct_state(m) for m in module.modules())


@dataclass
class TrainState:
    """The loop's own position: the number of optimizer steps taken (the data position too)."""
    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class ModelState:
    """The model, or this rank's pipeline stages as one tree, as DCP shards."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.root, options=_OPTIONS)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.root, state, options=_OPTIONS)


class OptimizerState:
    """The optimizer's state under the parameters' canonical names."""

    def __init__(self, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.root, self.optimizer = root, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.root, self.optimizer, options=_OPTIONS)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.root, self.optimizer, state, options=_OPTIONS)


def training_state(modules: list[nn.Module], optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, train_state: TrainState) -> dict[str, Stateful]:
    """What a checkpoint holds, as the `Stateful` objects `dcp.save` / `dcp.load` expect."""
    root = as_one_module(modules)
    return {"model": ModelState(root), "optimizer": OptimizerState(root, optimizer), "scheduler": scheduler,
            "train": train_state}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _rng_file(path: str, rank: int) -> str:
    return os.path.join(path, f"rng_{rank:05d}.pt")


def save_checkpoint(state: Mapping[str, Stateful], root: str, step: int, keep: int,
                    files: Mapping[str, str]) -> str:
    """Writes `root/step_XXXXXXX` on every rank (a collective): `state` through DCP, each rank's
    RNG, and `files` (name -> text, written by rank 0). Keeps the newest `keep`; returns the path."""
    rank = dist.get_rank()
    final = os.path.join(root, checkpoint_name(step))
    tmp = final + _TMP_SUFFIX
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this step that crashed before
        os.makedirs(tmp)
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
    dist.barrier()
    dcp.save(dict(state), checkpoint_id=tmp)
    torch.save(_rng_state(), _rng_file(tmp, rank))
    dist.barrier()
    if rank == 0:
        if os.path.exists(final):  # resumed from an older checkpoint and saved this step again
            os.rename(final, final + _OLD_SUFFIX)
        os.rename(tmp, final)
        shutil.rmtree(final + _OLD_SUFFIX, ignore_errors=True)
        _prune(root, keep)
    dist.barrier()  # nobody resumes or exports a folder that is still being renamed
    logger.info("checkpoint: saved %s", final)
    return final


def _prune(root: str, keep: int) -> None:
    """Keeps the newest `keep` complete checkpoints; removes leftovers of interrupted saves."""
    for _, path in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(path)
    for name in os.listdir(root):
        if name.startswith("step_") and name.endswith((_TMP_SUFFIX, _OLD_SUFFIX)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_weights(modules: list[nn.Module], path: str) -> None:
    """Only the model weights of `path` (fine-tuning): optimizer, schedule, step and RNG start fresh."""
    dcp.load({"model": ModelState(as_one_module(modules))}, checkpoint_id=path)


def load_checkpoint(state: Mapping[str, Stateful], path: str) -> None:
    """Restores every object of `state` from `path`, and this rank's RNG when the world size is
    the one that saved it."""
    dcp.load(dict(state), checkpoint_id=path)
    rng_file = _rng_file(path, dist.get_rank())
    saved_world = sum(1 for name in os.listdir(path) if name.startswith("rng_"))
    if saved_world == dist.get_world_size() and os.path.isfile(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    elif dist.get_rank() == 0:
        # Another world size: there is no rank-to-rank mapping of random streams; the model,
        # optimizer, schedule and data position are restored all the same.
        logger.info("checkpoint: saved by %d ranks, running on %d; RNG states start fresh",
                    saved_world, dist.get_world_size())
