"""Allocate a parallelized meta-device model and fill each rank's shards from a weight source.

A source fills one module's direct tensors at a time, given for each the global shape and the
region of it this rank holds (from the DTensor's mesh and placements), so nothing a rank
allocates grows with the model beyond its own shards and one module's worth of buffer:
- `SeededInit` (harness/init_weights.py): fresh weights for a seed;
- `HFCheckpoint` (harness/hf_checkpoint.py): a local safetensors checkpoint, read sliced;
- `InMemoryWeights`: copies out of a whole model already in memory (tests, small models).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from harness.init_weights import Target

# Wrappers that checkpointing and compile insert into module paths; state-dict keys omit them.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class WeightSource(Protocol):
    def fill(self, module_name: str, module: nn.Module, targets: dict[str, Target]) -> None: ...


class InMemoryWeights:
    """The tensors of a whole model in memory, by canonical name."""

    def __init__(self, model: nn.Module) -> None:
        self.tensors = dict(model.named_parameters(remove_duplicate=False))
        self.tensors.update(model.named_buffers(remove_duplicate=False))

    def fill(self, module_name: str, module: nn.Module, targets: dict[str, Target]) -> None:
        for target in targets.values():
            target.local.copy_(self.tensors[target.name][target.region])


def materialize(model: nn.Module, weights: WeightSource | nn.Module, device: torch.device | str) -> None:
    """Allocates `model` on `device` and fills every rank's shards from `weights` (a whole model in
    memory is taken as `InMemoryWeights`)."""
    source = InMemoryWeights(weights) if isinstance(weights, nn.Module) else weights
    tied = _tied_parameters(model)
    model.to_empty(device=device)
    # `to_empty` gives each module its own new tensor, so a parameter that two modules share
    # (tied embeddings) would come out as two; point the other owners back at the first one.
    for (first, first_name), others in tied:
        for owner, name in others:
            setattr(owner, name, first._parameters[first_name])
    filled: set[int] = set()
    with torch.no_grad():
        for module_name, module in model.named_modules():
            name = canonical_name(f"{module_name}.") if module_name else ""
            # A tied parameter is filled once, by its first owner (the input embedding).
            targets = {attr: _target(name + attr, tensor, attr not in module._non_persistent_buffers_set)
                       for attr, tensor in [*module._parameters.items(), *module._buffers.items()]
                       if tensor is not None and id(tensor) not in filled}
            filled.update(id(tensor) for tensor in [*module._parameters.values(), *module._buffers.values()])
            if targets:
                source.fill(name.rstrip("."), module, targets)


def _tied_parameters(model: nn.Module) -> list[tuple[tuple[nn.Module, str], list[tuple[nn.Module, str]]]]:
    """(first owner, other owners) of every parameter held by more than one module."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, name))
    return [(found[0], found[1:]) for found in owners.values() if len(found) > 1]


def _target(name: str, tensor: torch.Tensor, persistent: bool) -> Target:
    if isinstance(tensor, DTensor):
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        region = tuple(slice(start, start + size) for start, size in zip(offset, shape))
        local = tensor.to_local()
        assert tuple(local.shape) == tuple(shape), f"{name}: local shard {tuple(local.shape)} != {tuple(shape)}"
        return Target(name, local, tensor.shape, region, persistent)
    return Target(name, tensor, tensor.shape, tuple(slice(None) for _ in tensor.shape), persistent)
