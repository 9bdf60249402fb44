"""Tensor parallel with sequence parallel, from the TP plan each family declares to transformers.

transformers puts a plan on every config class that has one (`config.base_model_tp_plan`:
module-name patterns under the base model -> style). It is translated here to PyTorch's DTensor
parallel styles, which FSDP2 shards on top of (2-D DTensor parameters), as TorchTitan does;
transformers' own styles replace each module's forward and serve its inference loading, and are
not what FSDP2 is tested with.

Sequence parallel (Megatron SP) is always on: between the blocks of a decoder layer the residual
stream and the norms hold this rank's slice of the sequence (Shard(1)); each block that holds
planned modules (attention, MLP) all-gathers its input, its column-parallel projections give
this rank's heads or features, and its row-parallel output projection reduce-scatters back to
the sequence slice (a block without one, gathered throughout, has its output cut to the slice).
Parameters the plan leaves unplaced inside a planned block work on whole activations, as
transformers keeps them: they stay replicated, and the block runs them as local tensors; a
learnable activation (Apertus's XIELU) works on this rank's features instead, so its block's
activations and its parameters stay DTensors, and DTensor sums its gradient over the ranks. The
embeddings and the LM head are sharded over the vocabulary; the head's
logits stay vocabulary-sharded (a DTensor) through the family's logit processing into the loss
(parallel/vocab_parallel_loss.py). The base model's forward reads positions and the mask from
the whole embedded sequence, so the sequence is split at the first layer's input, not at the
embeddings.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from parallel.tp_styles import (CollectiveAwaited, HiddenStatesInput, HiddenStatesOutput, LocalParameters,
                                MlaKvAProjection, ReplicatedParameters, Styles)

# The family plan's styles this translation honours, and what each becomes; `output` is the
# placement a row-parallel projection's output takes (Shard(1), the sequence slice, where it ends
# its block; Replicate() where the block reads it again). `colwise_gather_output` and
# `rowwise_split_input` shard the weights of a block whose activations stay whole (a norm over
# all heads, a fused projection split after it): the outputs are gathered along the features and
# the row-parallel input split locally. A module styled `replicated_with_grad_allreduce` (Qwen3's
# per-head q/k norms) works on rows that differ per rank (this rank's heads): replicated weights
# over inputs sharded along any leading dimension give the summed gradient, so SequenceParallel
# over dim 0 is that style. `embedding_rowwise` shards a table along the vocabulary and sums the
# ranks' lookups.
_STYLES: dict[str, Callable[[Placement], ParallelStyle]] = {
    "colwise": lambda output: ColwiseParallel(),
    "colwise_gather_output": lambda output: ColwiseParallel(output_layouts=Replicate()),
    "rowwise": lambda output: RowwiseParallel(output_layouts=output),
    "rowwise_split_input": lambda output: RowwiseParallel(input_layouts=Replicate(), output_layouts=output),
    "replicated_with_grad_allreduce": lambda output: SequenceParallel(sequence_dim=0, use_local_output=True),
    "embedding_rowwise": lambda output: RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
}
# Styles of row-parallel projections: their output is a partial sum until reduced.
_ROWWISE = ("rowwise", "rowwise_split_input")
# Styles whose output is sharded along the features: the activations after them differ per rank.
_SHARDS_ACTIVATIONS = ("colwise",)
# Styles of the modules of a block that reads its input only through column-parallel projections.
_PROJECTION_BLOCK = ("colwise", "rowwise", "replicated_with_grad_allreduce")
# Styles of a module that runs on its own parameters' local tensors (handled below, not in _STYLES).
_MLA_KV_A = "mla_kv_a_proj"
_LOCAL_PARAMS = "local_params"
# Placement of a bare parameter (attention sinks, per-head gate biases) by its plan style.
_PARAMETER_PLACEMENTS = {"colwise": Shard(0)}
SUPPORTED_STYLES = (*_STYLES, _MLA_KV_A, _LOCAL_PARAMS)
# What torch's DTensor styles shard, by plan style.
_MODULE_TYPES = {"colwise": nn.Linear, "colwise_gather_output": nn.Linear, "rowwise": nn.Linear,
                 "rowwise_split_input": nn.Linear, "embedding_rowwise": nn.Embedding}


@dataclass(frozen=True)
class TensorParallelParts:
    """What tensor parallel shards, handed in by whoever knows the model's structure."""
    family: str  # for messages
    plan: dict[str, str] | None  # the family's TP plan: names relative to `base` -> style
    base: nn.Module  # the base model (decoder stack)
    layers: Sequence[nn.Module]  # its decoder layers
    routed: Sequence[nn.Module]  # the routers and routed experts of its MoE blocks
    embeddings: nn.Module | None  # None on a pipeline stage without them, likewise the norm and head
    final_norm: nn.Module | None
    head: nn.Module | None
    expert_parallel: Sequence[nn.Module] = ()  # the routed experts expert parallel shards after tensor parallel


def _pattern(key: str) -> re.Pattern:
    # transformers writes a layer index as `*`: one dotted name component.
    return re.compile(re.escape(key).replace(r"\*", r"[^.]+"))


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _holds_grouped_weights(module: nn.Module) -> bool:
    """Stacked weights (3-D or more, not a convolution's): routed experts keep one weight per
    expert that way (transformers' fused layout), and no plan style splits them."""
    return (not isinstance(module, nn.modules.conv._ConvNd)
            and any(param.ndim >= 3 for param in module.parameters(recurse=False)))


def _matches(plan: dict[str, str], names: list[str]) -> dict[str, str]:
    patterns = [(_pattern(key), style) for key, style in plan.items()]
    matched = {}
    for name in names:
        style = next((style for pattern, style in patterns if pattern.fullmatch(name)), None)
        if style is not None:
            matched[name] = style
    return matched


def layer_styles(parts: TensorParallelParts) -> list[dict[str, ParallelStyle]]:
    """For each decoder layer, its sub-modules' styles by name relative to the layer. Raises
    ValueError (one line naming the family, and the style or module) for a plan this translation
    cannot honour. Needs no process group; the model may be on the meta device."""
    family, plan, base, layers = parts.family, parts.plan, parts.base, parts.layers
    if not plan:
        raise ValueError(f"{family}: transformers ships no tensor-parallel plan for it (config.base_model_tp_plan); "
                         "use parallel.tp=1")
    for key, style in plan.items():
        if style not in SUPPORTED_STYLES:
            raise ValueError(f"{family}: its TP plan styles {key} {style!r}, which tensor parallel does not "
                             f"support (supported: {', '.join(SUPPORTED_STYLES)}); use parallel.tp=1")
    names = {module: name for name, module in base.named_modules()}
    planned = _matches(plan, list(names.values()))
    planned_params = _matches(plan, [name for name, _ in base.named_parameters()])
    # The config, not the embeddings: a later pipeline stage holds no embeddings.
    context = _Context(family, width=base.config.hidden_size, rope_dim=getattr(base.config, "qk_rope_head_dim", None),
                       routed=frozenset(map(id, parts.routed)),
                       expert_parallel=frozenset(map(id, parts.expert_parallel)))
    styles = []
    for layer in layers:
        prefix = names[layer] + "."
        in_layer = {name[len(prefix):]: style for name, style in planned.items() if name.startswith(prefix)}
        params = {name[len(prefix):]: style for name, style in planned_params.items() if name.startswith(prefix)}
        styles.append(_layer_styles(context, layer, in_layer, params))
    in_layers = {f"{names[layer]}.{name}" for layer in layers
                 for name in [*dict(layer.named_modules()), *dict(layer.named_parameters())]}
    outside = sorted(name for name in {*planned, *planned_params} - in_layers
                     if not (name == names.get(parts.embeddings) and planned.get(name) == "embedding_rowwise"))
    if outside:
        raise ValueError(f"{family}: its TP plan places {outside[0]} outside the decoder layers, which tensor "
                         "parallel does not support; use parallel.tp=1")
    if getattr(base.config, "hidden_size_per_layer_input", None):
        raise ValueError(f"{family}: its layers take per-layer inputs computed from the whole sequence, while "
                         "sequence parallel hands each layer the rank's slice of it; use parallel.tp=1")
    return styles


@dataclass(frozen=True)
class _Context:
    family: str  # for messages
    width: int  # the residual stream's features
    rope_dim: int | None  # the config's qk_rope_head_dim (MLA)
    routed: frozenset[int]  # ids of the routers and routed experts (TensorParallelParts.routed)
    expert_parallel: frozenset[int]  # ids of TensorParallelParts.expert_parallel


def _layer_styles(context: _Context, layer: nn.Module, planned: dict[str, str],
                  planned_params: dict[str, str]) -> dict[str, ParallelStyle]:
    family, cls = context.family, type(layer).__name__
    if _owns_parameters(layer):
        raise ValueError(f"{family}: {cls} holds parameters of its own, which its TP plan does not place; "
                         "use parallel.tp=1")
    styles: dict[str, ParallelStyle] = {}
    for child_name, child in layer.named_children():
        if any(id(module) in context.routed for module in child.modules()):
            # An MoE block (or its router or experts, where the layer holds them) works token by
            # token: it runs on this rank's slice of the sequence with its parameters replicated
            # (what the plan places in it, a shared expert's projections, included), each rank's
            # gradient covering its own tokens: no collective in forward, a summed gradient.
            # Experts under expert parallel are FSDP-sharded on their own, gathered in their own
            # forward (after the block's): they take their local tensors there.
            experts = [name for name, module in child.named_modules()
                       if name and id(module) in context.expert_parallel]
            styles[child_name] = LocalParameters({name: Replicate() for name, _ in child.named_parameters()
                                                  if not any(name.startswith(f"{e}.") for e in experts)},
                                                 summed_gradient=True)
            for name in experts:
                styles[f"{child_name}.{name}"] = LocalParameters(
                    {param: Replicate() for param, _ in child.get_submodule(name).named_parameters()},
                    summed_gradient=True)
            continue
        in_child, params_in_child = _under(planned, child_name), _under(planned_params, child_name)
        if not in_child and not params_in_child:
            if next(child.parameters(), None) is None:
                continue
            experts = next((name for name, module in child.named_modules(prefix=child_name)
                            if _holds_grouped_weights(module)), None)
            if experts is not None:
                raise ValueError(f"{family}: {cls}.{experts} ({type(layer.get_submodule(experts)).__name__}) holds "
                                 "stacked (3-D) weights, which its TP plan does not place; use parallel.tp=1")
            if _is_norm(child) and all(not _owns_parameters(sub) for sub in child.modules() if sub is not child):
                styles[child_name] = SequenceParallel(use_local_output=True)
                continue
            # A block the plan leaves whole (GPT-OSS's attention, a Mamba mixer, a convolution, a
            # gated norm) runs replicated, as transformers keeps it: on the gathered sequence, its
            # output cut back to this rank's slice, every rank computing the whole gradient.
            reason = _whole_block_unsupported(layer, child_name)
            if reason is not None:
                raise ValueError(f"{family}: {cls}.{child_name} ({type(child).__name__}) holds parameters its TP "
                                 f"plan does not place, and {reason}; use parallel.tp=1")
        styles.update(_block_styles(context, cls, child_name, child, in_child, params_in_child))
    return styles


def _whole_block_unsupported(layer: nn.Module, child_name: str) -> str | None:
    """Why the layer's forward cannot run `self.<child_name>` as a replicated block, if it cannot:
    the block's hooks are on its forward and cut its first output only, so the layer must call
    nothing else of it (Gemma 3n's AltUp.predict, a ModuleList of norms indexed) and read no
    other output (a hyper-connection's mixing weights, an attention's top-k indices)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(type(layer).forward)))
    called = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _is_self_attribute(node.func, child_name):
            called = True
        elif isinstance(node, ast.Attribute) and _is_self_attribute(node.value, child_name):
            return f"the layer uses its {node.attr}, not only its forward"
        elif isinstance(node, ast.Subscript) and _is_self_attribute(node.value, child_name):
            return "the layer indexes it rather than calling its forward"
        elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
              and _is_self_attribute(node.value.func, child_name)):
            for target in node.targets:
                read = [element.id for element in getattr(target, "elts", [])[1:]
                        if not (isinstance(element, ast.Name) and element.id.startswith("_"))]
                if read:
                    return f"the layer reads more than its first output ({read[0]!r})"
    return None if called else "the layer does not call it"


def _is_self_attribute(node: ast.expr, name: str) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == name and isinstance(node.value, ast.Name)
            and node.value.id == "self")


def _under(names: dict[str, str], prefix: str) -> dict[str, str]:
    return {name: style for name, style in names.items() if name == prefix or name.startswith(prefix + ".")}


def _block_styles(context: _Context, cls: str, block_name: str, block: nn.Module, planned: dict[str, str],
                  planned_params: dict[str, str]) -> dict[str, ParallelStyle]:
    """Styles of one block of a layer (attention, MLP) that its plan places modules in: its input
    gathered along the sequence, its planned modules, the parameters it runs on local tensors
    (those of `local_params` modules, and those the plan leaves unplaced, replicated), and its
    output back to the sequence slice (reduce-scattered by its output projection, or sliced)."""
    family = context.family
    modules = dict(block.named_modules(prefix=block_name))
    local_owners = {name for name, style in planned.items() if style == _LOCAL_PARAMS}
    for name, style in planned_params.items():
        if name.rpartition(".")[0] not in local_owners or style not in _PARAMETER_PLACEMENTS:
            raise ValueError(f"{family}: its TP plan styles the parameter {cls}.{name} {style!r} without "
                             "local_params on its module, which tensor parallel does not support; use parallel.tp=1")
    experts = next((name for name, module in modules.items() if name not in planned and _holds_grouped_weights(module)),
                   None)
    if experts is not None:
        raise ValueError(f"{family}: {cls}.{experts} ({type(modules[experts]).__name__}) holds stacked (3-D) weights, "
                         "which its TP plan does not place; use parallel.tp=1")
    shards_activations = any(style in _SHARDS_ACTIVATIONS for style in planned.values())
    # A block whose every parameter is in a column- or row-parallel projection (or a per-head norm
    # after one) reads its input only through its column-parallel projections: each runs on its
    # local weight rows and hands back an unreduced input gradient, which the block's input
    # reduce-scatters once (Megatron's sequence parallel), not an all-reduce per projection.
    only_projections = all(planned.get(name) in _PROJECTION_BLOCK for name, module in modules.items()
                           if _owns_parameters(module))
    outputs = [name for name, style in planned.items()
               if style in _ROWWISE and getattr(modules[name], "out_features", None) == context.width]
    block_output = outputs[0] if len(outputs) == 1 else None
    on_dtensors = _modules_on_dtensors(context, cls, modules, planned, shards_activations)
    styles: dict[str, ParallelStyle] = {}
    local: dict[str, Placement] = {}  # by dotted name, the block's own prefixed
    for name, module in modules.items():
        style = planned.get(name)
        own = [f"{name}.{param}" for param, value in module._parameters.items() if value is not None]
        if style in (_LOCAL_PARAMS, _MLA_KV_A) or style is None:
            inside_planned = any(name.startswith(other + ".") for other, other_style in planned.items()
                                 if other_style in _STYLES)
            if inside_planned or (style is None and not own):
                continue
            # Parameters the plan leaves unplaced work on whole activations (transformers keeps them
            # replicated): a norm between gathered projections, MLA's low-rank query projection.
            # Beside column-parallel projections, an unplaced Linear or norm can only take whole
            # activations (a sharded one would not fit its width); anything else (a learnable
            # activation) might take this rank's features, and runs on DTensors (_modules_on_dtensors).
            if style is None and name in on_dtensors:
                styles[name] = ReplicatedParameters()
                continue
            local.update((param, _PARAMETER_PLACEMENTS[planned_params[param]] if param in planned_params
                          else Replicate()) for param in own)
            if style == _MLA_KV_A:
                if context.rope_dim is None:
                    raise ValueError(f"{family}: its TP plan styles {cls}.{name} 'mla_kv_a_proj' but its config has "
                                     "no qk_rope_head_dim; use parallel.tp=1")
                styles[name] = MlaKvAProjection(context.rope_dim)
            continue
        expected = _MODULE_TYPES.get(style, nn.Module)
        if not isinstance(module, expected):
            raise ValueError(f"{family}: its TP plan styles {cls}.{name} ({type(module).__name__}) {style!r}, "
                             f"which tensor parallel applies to {expected.__name__} only; use parallel.tp=1")
        if style == "colwise" and only_projections:
            styles[name] = LocalParameters({param: Shard(0) for param, value in module._parameters.items()
                                            if value is not None})
        elif style == "colwise" and on_dtensors:
            styles[name] = ColwiseParallel(use_local_output=False)
        else:
            styles[name] = _STYLES[style](Shard(1) if name == block_output else Replicate())
    boundary = [HiddenStatesInput(Shard(1), Replicate(), partial_gradient=only_projections)]
    if block_output is None:
        boundary.append(HiddenStatesOutput(Replicate(), Shard(1)))
    if local:
        boundary.append(LocalParameters({name[len(block_name) + 1:]: placement for name, placement in local.items()}))
    styles[block_name] = Styles(*boundary)
    return styles


def _modules_on_dtensors(context: _Context, cls: str, modules: dict[str, nn.Module], planned: dict[str, str],
                         shards_activations: bool) -> set[str]:
    """The modules of a block, beside column-parallel projections, that hold parameters the plan
    leaves unplaced and are neither a Linear nor a norm (Apertus's learnable XIELU activation): they
    may take this rank's features, so the block's column-parallel outputs stay DTensors
    (Shard(-1)) and these parameters replicated DTensors, whose gradient DTensor sums over the
    ranks where the features were sharded. Only in a block of column- and row-parallel projections
    and such modules: anything else in it runs on local tensors, which cannot meet a DTensor."""
    if not shards_activations:
        return set()
    outside = {name: module for name, module in modules.items() if _owns_parameters(module)
               and not any(name.startswith(other + ".") for other in planned)}
    found = {name for name, module in outside.items()
             if name not in planned and not (isinstance(module, nn.Linear) or _is_norm(module))}
    others = [name for name in outside if name not in found and planned.get(name) not in ("colwise", "rowwise")]
    if found and (others or any(_owns_parameters(sub) for name in found for sub in modules[name].modules()
                                if sub is not modules[name])):
        name = sorted(found)[0]
        raise ValueError(f"{context.family}: {cls}.{name} ({type(modules[name]).__name__}) holds parameters its TP "
                         "plan does not place beside column-parallel projections; use parallel.tp=1")
    return found


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
        parallelize_module(embeddings, mesh, Styles(
            RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()), CollectiveAwaited()))
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
