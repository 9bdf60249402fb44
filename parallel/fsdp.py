"""FSDP2 (or HSDP on a 2-D mesh): each transformer block, then the root.

Gradients are summed, never averaged, across shards: the loss is already divided by the
step's global token count, so a sum over ranks is the one-process gradient. This also keeps
expert parameters (sharded over efsdp, with their tokens gathered over ep) on the same scale
as dense ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard


def mixed_precision_policy(device_type: str) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on CUDA; plain fp32 on CPU."""
    if device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _expert_placement(experts: nn.Module, mesh: DeviceMesh) -> Callable[[nn.Parameter], Shard] | None:
    """Shard experts along dim 1 when this rank holds fewer experts than there are FSDP shards:
    along dim 0 some shards would be padding only."""
    local_experts = min((p.to_local() if isinstance(p, DTensor) else p).shape[0] for p in experts.parameters())
    if local_experts < mesh.size(mesh.ndim - 1):
        return lambda param: Shard(1)
    return None


def apply_fsdp(model: nn.Module, layers: Iterable[nn.Module], mesh: DeviceMesh, *,
               reshard_after_forward: bool, expert_modules: Iterable[nn.Module] = (),
               expert_mesh: DeviceMesh | None = None) -> None:
    """Shard experts over `expert_mesh`, each layer and then the root over `mesh`."""
    policy = mixed_precision_policy(mesh.device_type)
    for experts in expert_modules:
        assert expert_mesh is not None, "expert modules need the efsdp mesh"
        fully_shard(experts, mesh=expert_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    shard_placement_fn=_expert_placement(experts, expert_mesh))
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root keeps its parameters (embeddings, final norm, lm_head) gathered after forward:
    # backward needs them again at once. Its inputs stay as they come: token ids, hidden states
    # already in the compute dtype, and statistics a pipeline stage carries in float32 (counts
    # past 256 are not exact in bf16).
    fully_shard(model, mesh=mesh, mp_policy=dataclasses.replace(policy, cast_forward_inputs=False),
                reshard_after_forward=False)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # A factor of 1 otherwise becomes PREMUL_SUM, which gloo cannot run.
            module.set_force_sum_reduction_for_comms(True)


def _with_every_parameter(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + 0.0 * torch.stack([p.sum() for p in module.parameters()]).sum()


def give_every_parameter_a_gradient(modules: Iterable[nn.Module]) -> None:
    """FSDP2 reduce-scatters the gradients each rank has, so a parameter that gets none on one rank
    and one on another desynchronizes the collective. transformers' eager expert loops skip the
    experts no token picked (LongCat-Flash's zero-computation experts can leave a layer's real
    experts unpicked on one rank): adding zero times the sum of their parameters to the output
    gives each a gradient, zero where unused, on every rank. Call before `apply_fsdp`."""
    for module in modules:
        module.register_forward_hook(_with_every_parameter)
