"""Tensor parallel with sequence parallel, from the TP plan each family declares to transformers.

transformers puts a plan on every config class that has one (`config.base_model_tp_plan`:
module-name patterns under the base model -> style). It is translated here to PyTorch's DTensor
parallel styles, which FSDP2 shards on top of (2-D DTensor parameters), as TorchTitan does;
transformers' own styles replace each module's forward and serve its inference loading, and are
not what FSDP2 is tested with.

Sequence parallel (Megatron SP) is always on: between the blocks of a decoder layer the residual
stream and the norms hold this rank's slice of the sequence (Shard(1)); each block that holds
planned modules (attention, MLP) all-gathers its input, its column-parallel projections give
this rank's heads or features, and its row-parallel projection reduce-scatters back to the
sequence slice. The embeddings and the LM head are sharded over the vocabulary; the head's
logits stay vocabulary-sharded (a DTensor) through the family's logit processing into the loss
(parallel/vocab_parallel_loss.py). The base model's forward reads positions and the mask from
the whole embedded sequence, so the sequence is split at the first layer's input, not at the
embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel,
                                               parallelize_module)

# The family plan's styles this translation honours, and what each becomes. A module styled
# `replicated_with_grad_allreduce` (Qwen3's per-head q/k norms) works on rows that differ per rank
# (this rank's heads): replicated weights over inputs sharded along any leading dimension give the
# summed gradient, so SequenceParallel over dim 0 is that style.
_STYLES = {
    "colwise": lambda: ColwiseParallel(),
    "rowwise": lambda: RowwiseParallel(output_layouts=Shard(1)),
    "replicated_with_grad_allreduce": lambda: SequenceParallel(sequence_dim=0, use_local_output=True),
}
SUPPORTED_STYLES = tuple(_STYLES)


@dataclass(frozen=True)
class TensorParallelParts:
    """What tensor parallel shards, handed in by whoever knows the model's structure."""
    family: str  # for messages
    plan: dict[str, str] | None  # the family's TP plan: names relative to `base` -> style
    base: nn.Module  # the base model (decoder stack)
    layers: Sequence[nn.Module]  # its decoder layers
    embeddings: nn.Module | None  # None on a pipeline stage without them, likewise the norm and head
    final_norm: nn.Module | None
    head: nn.Module | None


class HiddenStatesInput(ParallelStyle):
    """Redistributes a module's hidden states (its first positional argument, or the
    `hidden_states` keyword HF layers pass) from one placement to another, handing on a local
    tensor."""

    def __init__(self, current: Placement, desired: Placement) -> None:
        super().__init__()
        self.current, self.desired = current, desired

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def redistribute(tensor):
            assert not isinstance(tensor, DTensor), "hidden states travel between modules as local tensors"
            as_dtensor = DTensor.from_local(tensor, device_mesh, (self.current,), run_check=False)
            return as_dtensor.redistribute(placements=(self.desired,)).to_local()

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (redistribute(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": redistribute(kwargs["hidden_states"])}

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module


def _pattern(key: str) -> re.Pattern:
    # transformers writes a layer index as `*`: one dotted name component.
    return re.compile(re.escape(key).replace(r"\*", r"[^.]+"))


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def layer_styles(parts: TensorParallelParts) -> list[dict[str, ParallelStyle]]:
    """For each decoder layer, its sub-modules' styles by name relative to the layer. Raises
    ValueError (one line naming the family, and the style or module) for a plan this translation
    cannot honour. Needs no process group; the model may be on the meta device."""
    family, plan, base, layers = parts.family, parts.plan, parts.base, parts.layers
    if not plan:
        raise ValueError(f"{family}: transformers ships no tensor-parallel plan for it (config.base_model_tp_plan); "
                         "use parallel.tp=1")
    for key, style in plan.items():
        if style not in _STYLES:
            raise ValueError(f"{family}: its TP plan styles {key} {style!r}, which tensor parallel does not "
                             f"support (supported: {', '.join(SUPPORTED_STYLES)}); use parallel.tp=1")
    patterns = [(_pattern(key), style) for key, style in plan.items()]
    names = {module: name for name, module in base.named_modules()}
    planned = {}
    for name, module in base.named_modules():
        style = next((style for pattern, style in patterns if pattern.fullmatch(name)), None)
        if style is not None:
            planned[name] = style
    styles = []
    for layer in layers:
        prefix = names[layer] + "."
        in_layer = {name[len(prefix):]: style for name, style in planned.items() if name.startswith(prefix)}
        styles.append(_layer_styles(family, layer, in_layer))
    outside = sorted(set(planned) - {names[layer] + "." + name for layer, own in zip(layers, styles) for name in own})
    if outside:
        raise ValueError(f"{family}: its TP plan places {outside[0]} outside the decoder layers, which tensor "
                         "parallel does not support; use parallel.tp=1")
    return styles


def _layer_styles(family: str, layer: nn.Module, planned: dict[str, str]) -> dict[str, ParallelStyle]:
    cls = type(layer).__name__
    if _owns_parameters(layer):
        raise ValueError(f"{family}: {cls} holds parameters of its own, which its TP plan does not place; "
                         "use parallel.tp=1")
    styles: dict[str, ParallelStyle] = {}
    for child_name, child in layer.named_children():
        inside = {name: style for name, style in planned.items() if name.startswith(child_name + ".")}
        if not inside:
            if next(child.parameters(), None) is None:
                continue
            if not _is_norm(child):
                raise ValueError(f"{family}: {cls}.{child_name} ({type(child).__name__}) holds parameters its TP "
                                 "plan does not place; use parallel.tp=1")
            styles[child_name] = SequenceParallel(use_local_output=True)
            continue
        if "rowwise" not in inside.values():
            raise ValueError(f"{family}: {cls}.{child_name} has no rowwise module in its TP plan to bring its "
                             "output back to the sequence-sharded residual stream; use parallel.tp=1")
        for name, module in child.named_modules(prefix=child_name):
            covered = any(name == other or name.startswith(other + ".") for other in inside)
            if _owns_parameters(module) and not covered:
                raise ValueError(f"{family}: {cls}.{name} ({type(module).__name__}) holds parameters its TP plan "
                                 "does not place; use parallel.tp=1")
        styles[child_name] = HiddenStatesInput(Shard(1), Replicate())
        styles.update((name, _STYLES[style]()) for name, style in inside.items())
    return styles


def apply_tensor_parallel(parts: TensorParallelParts, mesh: DeviceMesh) -> None:
    """Shards the meta-device model over `mesh` (the tp view) in place; every parameter becomes
    a DTensor. A head tied to the embeddings stays tied (both are sharded along the vocabulary).

    A pipeline stage holds only some of the parts (None for the rest): hidden states enter and
    leave it as this rank's slice of the sequence, and only the stage with the embeddings splits
    the sequence, at its first layer's input."""
    layers, embeddings, final_norm, head = parts.layers, parts.embeddings, parts.final_norm, parts.head
    tied = head is not None and embeddings is not None and head.weight is embeddings.weight
    per_layer = layer_styles(parts)
    if embeddings is not None:
        assert layers, "the stage with the embeddings holds a decoder layer, whose input splits the sequence"
        parallelize_module(embeddings, mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
        parallelize_module(layers[0], mesh, HiddenStatesInput(Replicate(), Shard(1)))
    for layer, styles in zip(layers, per_layer):
        parallelize_module(layer, mesh, styles)
    if final_norm is not None:
        parallelize_module(final_norm, mesh, SequenceParallel(use_local_output=True))
    if head is not None:
        parallelize_module(head, mesh, ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                                       use_local_output=False))
    if tied:  # both shard the weight along the vocabulary (dim 0); sharding each made two parameters
        head.weight = embeddings.weight
    for module in (embeddings, *layers, final_norm, head):
        for name, param in module.named_parameters() if module is not None else ():
            assert isinstance(param, DTensor), f"{type(module).__name__}.{name} was left unplaced"
