"""transformers' checkpoint conversions, applied to one rank's region of a model tensor at a time.

A `WeightConverter` of transformers' conversion mapping (`transformers.conversion_mapping`) makes
model tensors out of the checkpoint tensors its source patterns match, through a chain of
operations: per-expert tensors merged and concatenated, a fused projection split or chunked, a
router stored transposed, gate and up rows interleaved, a family's own. `Conversion` is one use
of a converter, the checkpoint keys that `from_pretrained` collects for one target name. It runs
the chain once on meta tensors, which names and sizes every tensor the chain makes without
reading any, and then reads a region of one of them:

- through operations that move rows and columns without mixing them (`Split`, `Chunk`,
  `MergeModulelist`, `Concatenate`, `Transpose`, `Interleave` along the dimensions it leaves
  alone, and Inkling2-Loop's dequantization of an unquantized tensor, which hands it on) the
  region is traced back to the checkpoint, so a rank reads only the rows, columns and experts it
  holds;
- a chain with any other operation (`PermuteForRope`, Inkling2's vocabulary unpadding, ...)
  needs its sources whole: they are read whole and converted by transformers' own operations,
  and the rank keeps the chain's other targets until it fills them (`WholeConversions`), so each
  source is read once per rank.

`save_units` groups a model's tensors the way `save_pretrained` reverts them (the parts of a
split are joined back into one checkpoint tensor), so an export that writes the model a few
tensors at a time reverts every conversion whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (Chunk, Concatenate, ConversionOps, Inkling2LoopDequantizeExperts,
                                             Interleave, MergeModulelist, PrefixChange, Split, Transpose,
                                             WeightConverter, apply_converters, dot_natural_key)

Region = tuple[slice, ...]
# Regions wanted per key of a stage of the chain, per entry of that key's list of tensors.
Request = dict[str, dict[int, Region]]
Tensors = dict[str, dict[int, torch.Tensor]]
ReadKey = Callable[[str, Region | None], torch.Tensor]  # a checkpoint key's region (None: all of it)
Shapes = dict[str, list[torch.Size]]


class Conversion:
    """The model tensors one converter makes out of the checkpoint keys `keys` (per source
    pattern, in `from_pretrained`'s order), `target` being the name transformers renamed them to
    in `model`. `names` renames what it makes for the model that is filled (a multimodal model's
    language-model names to its text model's), and leaves out what that model does not have."""

    def __init__(self, converter: WeightConverter, keys: Mapping[str, list[str]], target: str, model: nn.Module,
                 shapes: Mapping[str, tuple[int, ...]], names: Mapping[str, str] | None = None) -> None:
        self.converter = converter
        self._names = names
        self.keys = {pattern: keys[pattern] for pattern in converter.source_patterns if pattern in keys}
        self.target = target
        self._model = model
        self.traced = False  # whether every operation lets a region be traced back to the checkpoint
        # Why the chain does not run on these tensors: the operation and its one-line error.
        self.error: tuple[ConversionOps, str] | None = None
        stage = {pattern: [torch.empty(shapes[key], device="meta") for key in pattern_keys]
                 for pattern, pattern_keys in self.keys.items()}
        self._stages = [_shapes(stage)]
        self.outputs: dict[str, str] = {}  # model name -> key of the chain's last stage
        for op in converter.operations:
            try:
                stage = _as_lists(op.convert({k: list(v) for k, v in stage.items()}, **self._op_arguments()))
            except Exception as e:  # any operation of any family may refuse tensors that do not fit it
                self.error = (op, str(e).splitlines()[0] if str(e) else type(e).__name__)
                return
            self._stages.append(_shapes(stage))
        self.outputs = {name: key for key, name in self._filled_names(stage).items()}
        self.traced = all(_traceable(op, before) for op, before in zip(converter.operations, self._stages))

    def shape(self, name: str) -> torch.Size:
        (shape,) = self._stages[-1][self.outputs[name]]
        return shape

    def read(self, name: str, region: Region, read_key: ReadKey) -> torch.Tensor:
        """`region` of model tensor `name`, reading only what makes it (a traced chain)."""
        assert self.traced, f"{name}: {self.converter.operations} need their sources whole"
        region = tuple(slice(*part.indices(size)[:2]) for part, size in zip(region, self.shape(name)))
        request: Request = {self.outputs[name]: {0: region}}
        combines = []
        for op, before, after in reversed(list(zip(self.converter.operations, self._stages, self._stages[1:]))):
            request, combine = _trace_back(op, self.converter.source_patterns, request, before, after)
            combines.append(combine)
        tensors = {pattern: {index: read_key(self.keys[pattern][index], part) for index, part in entries.items()}
                   for pattern, entries in request.items()}
        for combine in reversed(combines):
            tensors = combine(tensors)
        return tensors[self.outputs[name]][0]

    def convert_whole(self, read_key: ReadKey) -> dict[str, torch.Tensor]:
        """Every model tensor the chain makes, from its sources read whole, by transformers' operations."""
        stage = {pattern: [read_key(key, None) for key in pattern_keys] for pattern, pattern_keys in self.keys.items()}
        for op in self.converter.operations:
            stage = _as_lists(op.convert(stage, **self._op_arguments()))
        return {name: stage[key][0] for key, name in self._filled_names(stage).items()}

    def _filled_names(self, stage: Mapping[str, list[torch.Tensor]]) -> dict[str, str]:
        names = _model_names(stage, self.target)
        if self._names is None:
            return names
        return {key: self._names[name] for key, name in names.items() if name in self._names}

    def _op_arguments(self) -> dict:
        # What `WeightConverter.convert` passes: `Split` sizes its parts by the model's parameters.
        return dict(source_patterns=self.converter.source_patterns, target_patterns=self.converter.target_patterns,
                    full_layer_name=self.target, model=self._model, config=self._model.config, missing_keys=None)


class WholeConversions:
    """Reads of conversions that need their sources whole: each is converted once and its
    targets kept until this rank fills them, the last conversion's only."""

    def __init__(self) -> None:
        self._conversion: Conversion | None = None
        self._unread: dict[str, torch.Tensor] = {}

    def read(self, conversion: Conversion, name: str, region: Region, read_key: ReadKey) -> torch.Tensor:
        if self._conversion is not conversion or name not in self._unread:
            self._conversion, self._unread = conversion, conversion.convert_whole(read_key)
        return self._unread.pop(name)[region]


def save_units(model: nn.Module, names: Sequence[str]) -> list[list[str]]:
    """`names` (of `model`'s state dict), in their order, grouped as `save_pretrained` reverts
    them: the tensors one reversed converter takes together (a split's parts, joined back into
    the checkpoint's fused tensor) form one group, every other tensor one of its own."""
    # `revert_weight_conversion`'s transforms for a model built from its config.
    transforms = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
    reverted = [t.reverse_transform() for t in reversed(transforms) if isinstance(t, WeightConverter)]
    units: dict[str, list[str]] = {}
    for name in sorted(names, key=dot_natural_key):
        renamed, pattern = apply_converters(name, reverted)
        units.setdefault(renamed if pattern is not None else name, []).append(name)
    order = {name: i for i, name in enumerate(names)}
    return sorted(units.values(), key=lambda unit: min(order[name] for name in unit))


def _shapes(stage: Mapping[str, list[torch.Tensor]]) -> Shapes:
    return {key: [tensor.shape for tensor in tensors] for key, tensors in stage.items()}


def _as_lists(stage: Mapping[str, torch.Tensor | list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """Operations return a tensor or a list per key and accept either: lists throughout."""
    return {key: value if isinstance(value, list) else [value] for key, value in stage.items()}


def _model_names(stage: Mapping[str, list[torch.Tensor]], target: str) -> dict[str, str]:
    """The model name of each key of the chain's last stage: its patterns with the target name's
    prefix and suffix, as `WeightConverter.convert` expands them."""
    full_name = target.replace("*.", "0.") if "*." in target else target
    found = next((full_name.partition(key) for key in stage if key in full_name), None)
    if found is None:  # keys that are full names already
        return {key: key for key in stage}
    prefix, _, suffix = found
    return {key: prefix + key + suffix for key in stage}


# Operations whose output regions come from input regions of the same values.
_TRACED = (Split, Chunk, MergeModulelist, Concatenate, Transpose, Interleave)


def _traceable(op: ConversionOps, before: Shapes) -> bool:
    # Inkling2-Loop's dequantization hands an unquantized tensor, its only input, on as it is.
    return type(op) in _TRACED or (type(op) is Inkling2LoopDequantizeExperts and len(before) == 1)


def _trace_back(op: ConversionOps, source_patterns: list[str], request: Request, before: Shapes,
                after: Shapes) -> tuple[Request, Callable[[Tensors], Tensors]]:
    """The input regions of `op` that make `request` of its outputs, and how `op` makes them out
    of those regions; `before` and `after` are the shapes of its inputs and outputs."""
    if isinstance(op, MergeModulelist):
        return _trace_merge(op, request, before, after)
    ((key, entries),) = request.items()
    ((_, region),) = entries.items()
    if isinstance(op, Concatenate):
        return _trace_concatenate(op, source_patterns, key, region, before)
    ((source, (shape, *_)),) = before.items()  # the other operations take one tensor
    if isinstance(op, Inkling2LoopDequantizeExperts):
        return {source: {0: region}}, lambda t: {key: {0: t[source][0]}}
    if isinstance(op, (Split, Chunk)):  # the outputs are consecutive parts along `dim`
        dim = op.dim % len(shape)
        offset = 0
        for output, (output_shape,) in after.items():
            if output == key:
                break
            offset += output_shape[dim]
        part = slice(region[dim].start + offset, region[dim].stop + offset)
        return {source: {0: _along(region, dim, part)}}, lambda t: {key: {0: t[source][0]}}
    if isinstance(op, Transpose):
        (output_shape,) = after[key]
        # With check_dims, transformers transposes only a tensor not already of the model's shape.
        if op.check_dims and output_shape == shape:
            return {source: {0: region}}, lambda t: {key: {0: t[source][0]}}
        first, second = op.dim0 % len(shape), op.dim1 % len(shape)
        swapped = list(region)
        swapped[first], swapped[second] = region[second], region[first]
        return {source: {0: tuple(swapped)}}, lambda t: {key: {0: t[source][0].transpose(first, second)}}
    assert isinstance(op, Interleave), f"{op!r} cannot be traced"
    dim = op.dim % len(shape)

    def interleave(t: Tensors) -> Tensors:  # along `dim` whole, then the region's part of it
        (whole,) = op.convert({source: [t[source][0]]}, source_patterns=[source], target_patterns=[key]).values()
        return {key: {0: whole[(slice(None),) * dim + (region[dim],)]}}

    return {source: {0: _along(region, dim, slice(0, shape[dim]))}}, interleave


def _trace_merge(op: MergeModulelist, request: Request, before: Shapes,
                 after: Shapes) -> tuple[Request, Callable[[Tensors], Tensors]]:
    """Per key, a list of tensors (one per expert) stacked along `dim`: only the region's experts are read."""
    inputs = dict(zip(after, before))
    wanted: Request = {}
    stacks = {}
    for key, entries in request.items():
        ((_, region),) = entries.items()
        dim = op.dim % len(region)
        experts = range(region[dim].start, region[dim].stop)
        wanted[inputs[key]] = {i: region[:dim] + region[dim + 1:] for i in experts}
        stacks[key] = (inputs[key], experts, dim)
    return wanted, lambda t: {key: {0: torch.stack([t[source][i] for i in experts], dim=dim)}
                              for key, (source, experts, dim) in stacks.items()}


def _trace_concatenate(op: Concatenate, source_patterns: list[str], key: str, region: Region,
                       before: Shapes) -> tuple[Request, Callable[[Tensors], Tensors]]:
    """Every input tensor, in source-pattern order, joined along `dim`: only those the region overlaps are read."""
    dim, start, order = op.dim % len(region), 0, []
    wanted: Request = {}
    for pattern in (p for p in source_patterns if p in before):
        for index, shape in enumerate(before[pattern]):
            low, high = max(region[dim].start, start), min(region[dim].stop, start + shape[dim])
            if low < high:
                wanted.setdefault(pattern, {})[index] = _along(region, dim, slice(low - start, high - start))
                order.append((pattern, index))
            start += shape[dim]
    return wanted, lambda t: {key: {0: torch.cat([t[p][i] for p, i in order], dim=dim)}}


def _along(region: Region, dim: int, part: slice) -> Region:
    return region[:dim] + (part,) + region[dim + 1:]
