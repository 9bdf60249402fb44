"""The parallel styles tensor parallel adds to torch's (ColwiseParallel, RowwiseParallel,
SequenceParallel): hidden states redistributed between modules as local tensors, parameters placed
but run as local tensors, multi-head latent attention's shared rotary key, the embeddings' output
awaited for compiled blocks, replicated parameters, and several styles on one module."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


def _redistribute(tensor: torch.Tensor, mesh: DeviceMesh, current: Placement, desired: Placement,
                  partial_gradient: bool = False) -> torch.Tensor:
    assert not isinstance(tensor, DTensor), "hidden states travel between modules as local tensors"
    as_dtensor = DTensor.from_local(tensor, mesh, (current,), run_check=False)
    gradient = (Partial(),) if partial_gradient else None
    return as_dtensor.redistribute(placements=(desired,)).to_local(grad_placements=gradient)


class HiddenStatesInput(ParallelStyle):
    """Redistributes a module's hidden states (its first positional argument, or the
    `hidden_states` keyword HF layers pass) from one placement to another, handing on a local
    tensor. With `partial_gradient`, the gradient the module hands back is this rank's share of
    the sum over the ranks (its column-parallel projections' input gradients, left unreduced):
    the backward of a gather along the sequence is then one reduce-scatter."""

    def __init__(self, current: Placement, desired: Placement, partial_gradient: bool = False) -> None:
        super().__init__()
        self.current, self.desired, self.partial_gradient = current, desired, partial_gradient

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def redistribute(tensor: torch.Tensor) -> torch.Tensor:
            return _redistribute(tensor, device_mesh, self.current, self.desired, self.partial_gradient)

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (redistribute(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": redistribute(kwargs["hidden_states"])}

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module


class HiddenStatesOutput(ParallelStyle):
    """Redistributes a module's output (a tensor, or the first of a tuple) from one placement to
    another, handing on a local tensor."""

    def __init__(self, current: Placement, desired: Placement) -> None:
        super().__init__()
        self.current, self.desired = current, desired

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def hook(_module: nn.Module, _args: tuple, output):
            if isinstance(output, tuple):
                return (_redistribute(output[0], device_mesh, self.current, self.desired), *output[1:])
            return _redistribute(output, device_mesh, self.current, self.desired)

        module.register_forward_hook(hook)
        return module


class LocalParameters(ParallelStyle):
    """Places parameters of a module or its sub-modules (`placements`: dotted name relative to the
    module -> placement) and runs the module's forward on their local tensors: for code that is
    not DTensor-aware (an attention that reads its sinks, a convolution whose weight its parent
    reads, a norm between gathered projections). A local tensor's gradient is taken as having the
    parameter's placement, so a replicated parameter must see the same inputs on every rank (the
    plan leaves unplaced only what works on whole activations); with `summed_gradient`, as this
    rank's share of the sum over the ranks (a replicated parameter that sees this rank's tokens).
    The placements are read at each forward: expert parallel may have re-placed a parameter over
    (ep, tp) since, where the gradient is summed over the replicated dimension only."""

    def __init__(self, placements: dict[str, Placement], summed_gradient: bool = False) -> None:
        super().__init__()
        self.placements, self.summed_gradient = placements, summed_gradient

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        owners = []
        for name, placement in self.placements.items():
            owner_name, _, param_name = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            param = owner._parameters[param_name]
            owner.register_parameter(param_name, nn.Parameter(
                distribute_tensor(param, device_mesh, (placement,), src_data_rank=None),
                requires_grad=param.requires_grad))
            owners.append((owner, param_name))
        held: list[tuple[nn.Module, str, nn.Parameter]] = []

        def to_local(_module: nn.Module, _args: tuple) -> None:
            for owner, param_name in owners:
                param = owner._parameters[param_name]
                held.append((owner, param_name, param))
                summed = tuple(Partial() if placement.is_replicate() else placement for placement in param.placements)
                owner._parameters[param_name] = param.to_local(grad_placements=summed if self.summed_gradient else None)

        def restore(_module: nn.Module, _args: tuple, _output) -> None:
            for owner, param_name, param in held:
                owner._parameters[param_name] = param
            held.clear()

        module.register_forward_pre_hook(to_local)
        module.register_forward_hook(restore)
        return module


def _all_reduce_in_backward(tensor: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """`tensor` unchanged; its gradient summed over the mesh (each rank's holds its heads' part)."""
    return DTensor.from_local(tensor, mesh, (Replicate(),), run_check=False).to_local(grad_placements=(Partial(),))


class MlaKvAProjection(ParallelStyle):
    """The `mla_kv_a_proj` style (DeepSeek's multi-head latent attention) on the projection to the
    compressed keys and values plus the rotary key all heads share, whose weights stay replicated
    (its block runs it on their local tensors). The compressed part reaches the heads through the
    column-parallel kv_b projection, which sums its input gradient over the ranks; the rotary key
    (the last `rope_dim` features) goes straight to this rank's heads, so its gradient is summed
    here."""

    def __init__(self, rope_dim: int) -> None:
        super().__init__()
        self.rope_dim = rope_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
            compressed, rope = output.split([output.shape[-1] - self.rope_dim, self.rope_dim], dim=-1)
            return torch.cat([compressed, _all_reduce_in_backward(rope, device_mesh)], dim=-1)

        module.register_forward_hook(hook)
        return module


class CollectiveAwaited(ParallelStyle):
    """Hands on a module's output as a plain tensor where it is an AsyncCollectiveTensor (what
    RowwiseParallel's all-reduce hands on): a compiled block (train.compile) that takes one as its
    input gives it no gradient (torch 2.13), so the embeddings before the first layer would train on
    nothing. Copying it waits for the collective and keeps the autograd graph; `wait()` would not."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output.clone() if isinstance(output, AsyncCollectiveTensor) else output

        module.register_forward_hook(hook)
        return module


class Styles(ParallelStyle):
    """Several styles on one module, applied in order."""

    def __init__(self, *styles: ParallelStyle) -> None:
        super().__init__()
        self.styles = styles

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for style in self.styles:
            module = style._apply(module, device_mesh)
        return module


class ReplicatedParameters(ParallelStyle):
    """A module's own parameters as replicated DTensors: it runs on the DTensor activations of
    its block, and DTensor gives its parameters' gradient the sum over the ranks."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, param in list(module._parameters.items()):
            if param is not None:
                module.register_parameter(name, nn.Parameter(
                    distribute_tensor(param, device_mesh, (Replicate(),), src_data_rank=None),
                    requires_grad=param.requires_grad))
        return module
