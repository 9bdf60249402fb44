"""Save and resume a training run with torch.distributed.checkpoint (DCP).

On disk, `<dir>/step_0000040/` holds DCP's files (`.metadata` and one `.distcp` per rank), each
rank's RNG state (`rng_00003.pt`) and the HF model config (`config.json`, for export). A
checkpoint is written into `step_0000040.tmp` and rank 0 renames it once every rank has
finished, so a folder named `step_XXXXXXX` is always complete: a crash mid-save leaves only a
`.tmp` folder, which resume ignores and the next save removes.

Model and optimizer go through `get_state_dict` / `set_state_dict` with canonical parameter
names (wrappers stripped, pipeline stages named as in the whole model) and DTensor shards, so a
checkpoint saved by one layout (FSDP, HSDP, pipeline stages, expert parallel) loads into any
other. The data position is the step: the sampler derives every batch from it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from harness.config import CheckpointConfig

if TYPE_CHECKING:  # the trainer imports this module
    from harness.trainer import Run

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


def resume_path(cfg: CheckpointConfig) -> str | None:
    """The checkpoint a run starts from: `resume_from`, else the newest complete one in `dir`."""
    if cfg.resume_from is not None:
        return cfg.resume_from
    found = complete_checkpoints(cfg.dir) if cfg.dir else []
    return found[-1][1] if found else None


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


def is_due(cfg: CheckpointConfig, step: int, total_steps: int) -> bool:
    """Every `every` steps and at the end of training, when a directory is set."""
    if cfg.dir is None:
        return False
    return step == total_steps or (cfg.every > 0 and step % cfg.every == 0)


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


def _app_state(run: Run) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(as_one_module(run.modules), run.optimizer, options=_OPTIONS)
    return {"model": model_state, "optimizer": optim_state, "scheduler": run.scheduler.state_dict(),
            "step": run.step}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _rng_file(path: str, rank: int) -> str:
    return os.path.join(path, f"rng_{rank:05d}.pt")


def save_checkpoint(run: Run, root: str) -> str:
    """Writes `root/step_XXXXXXX` for `run.step` on every rank (a collective); returns its path."""
    rank = dist.get_rank()
    final = os.path.join(root, checkpoint_name(run.step))
    tmp = final + _TMP_SUFFIX
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this step that crashed before
        os.makedirs(tmp)
        run.modules[0].config.save_pretrained(tmp)
    dist.barrier()
    dcp.save(_app_state(run), checkpoint_id=tmp)
    torch.save(_rng_state(), _rng_file(tmp, rank))
    dist.barrier()
    if rank == 0:
        if os.path.exists(final):  # resumed from an older checkpoint and saved this step again
            os.rename(final, final + _OLD_SUFFIX)
        os.rename(tmp, final)
        shutil.rmtree(final + _OLD_SUFFIX, ignore_errors=True)
        _prune(root, run.cfg.checkpoint.keep)
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


def load_checkpoint(run: Run, path: str) -> None:
    """Restores model, optimizer, LR schedule, step and (same world size only) RNG from `path`."""
    state = _app_state(run)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(as_one_module(run.modules), run.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=_OPTIONS)
    run.scheduler.load_state_dict(state["scheduler"])
    run.step = int(state["step"])
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
    logger.info("checkpoint: resumed from %s at step %d", path, run.step)


class PreemptionRequest:
    """SIGUSR1 (SLURM's warning before the time limit or preemption) asks for a checkpoint and a
    clean exit.

    The handler only sets a flag; the loop asks `agreed()` at each step boundary, which takes
    the maximum over all ranks, so every rank stops after the same step even when the signal
    reached them at different times.
    """

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGUSR1, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
