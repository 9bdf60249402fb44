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
    for group in layers_sharing_parameters(layers):
        fully_shard(group if len(group) > 1 else group[0], mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward)
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


def layers_sharing_parameters(layers: Iterable[nn.Module]) -> list[list[nn.Module]]:
    """The layers in groups: layers that share a parameter (Zamba's one transformer block, called
    from several layers) in one group, every other layer alone. FSDP2 manages a parameter in one
    group only; a group of modules gathers it before the first of them runs and reduces its
    gradient once all of them have run backward."""
    groups: list[list[nn.Module]] = []
    owner: dict[int, int] = {}  # parameter id -> index of its group in `groups`
    for layer in layers:
        shared = sorted({owner[id(p)] for p in layer.parameters() if id(p) in owner})
        target = shared[0] if shared else len(groups)
        if not shared:
            groups.append([])
        for index in shared[1:]:  # a layer sharing with two groups joins them
            groups[target] += groups[index]
            groups[index] = []
        groups[target].append(layer)
        owner.update((id(p), target) for member in groups[target] for p in member.parameters())
    return [group for group in groups if group]


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
