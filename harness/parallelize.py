"""The fixed order in which a model (or one pipeline stage of it) is parallelized:
expert parallel -> activation checkpointing -> FSDP2 -> weights.

Runs on the meta-device model, so no rank ever holds more than its shards of the weights
beyond the reference copy it loads them from.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.config import Config
from harness.materialize import materialize
from harness.models import decoder_layers, expert_count
from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.fsdp import apply_fsdp
from parallel.mesh import ParallelDims, ParallelMeshes


def parallelize(module: nn.Module, *, cfg: Config, dims: ParallelDims, meshes: ParallelMeshes,
                reference: nn.Module, device: torch.device) -> None:
    layers = decoder_layers(module)
    expert_modules: list[nn.Module] = []
    if dims.ep > 1 and expert_count(module.config):
        from moe.expert_parallel import apply_expert_parallel

        expert_modules = apply_expert_parallel(module, meshes.ep, dispatcher=cfg.moe.dispatcher,
                                               strict=cfg.moe.dispatcher_strict)
    apply_activation_checkpointing(module, layers, cfg.ac.mode)
    reshard = cfg.parallel.reshard_after_forward
    if reshard is None:
        # Under pipeline parallel a stage runs several microbatches back to back; resharding
        # after each forward would all-gather the same weights again for every one of them.
        reshard = dims.pp == 1
    block_list = list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)
    # One data-parallel rank has nothing to shard or reduce; on CPU FSDP would only add DTensor
    # overhead, but on CUDA it is what runs the layers in bf16 (its mixed-precision policy).
    if meshes.fsdp.size() > 1 or device.type == "cuda":
        apply_fsdp(module, block_list, meshes.fsdp, reshard_after_forward=reshard,
                   expert_modules=expert_modules, expert_mesh=meshes.efsdp)
    materialize(module, reference, device)
