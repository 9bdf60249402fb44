"""Per-rank bytes of parameters, gradients, AdamW moments and FSDP's gathered copies, from the
exact shapes each layout gives this rank's shards.

Sharding, as the run applies it: tensor parallel splits what the family's TP plan styles
(colwise: dim 0, rowwise: dim 1 of the weight; embeddings and head over the vocabulary); expert
parallel splits experts (dim 0) over ep, replicated over tp; FSDP2 then shards dim 0 of what is
left over dp_shard (experts over dp_shard / ep, along dim 1 when fewer experts than shards
remain), padded to equal shards, and HSDP replicates those shards over dp_replicate. Parameters, gradients and both AdamW
moments are fp32 shards; FSDP gathers each layer in the compute dtype for its forward and
backward (two layers at once with prefetching), and the root (embeddings, final norm, head)
stays gathered for the whole step. Under pipeline parallel, layers stay gathered between
microbatches (reshard_after_forward=false), and each rank holds only its stages; a tied
embedding is held twice, by the first stage and as the last stage's head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from harness.model_parts import (decoder_layers, embeddings, has_tied_embeddings, lm_head, moe_blocks,
                                 tensor_parallel_parts)
from parallel.pipeline import stage_ids_for_rank
from parallel.pipeline_split import EMBEDDINGS, LM_HEAD, layer_name, stage_module_names
from parallel.tensor_parallel import layer_styles
from parallel.tp_styles import LocalParameters, Styles

FP32 = 4


@dataclass(frozen=True)
class Tensor:
    shape: tuple[int, ...]
    tp_dim: int | None  # the dimension tensor parallel splits, None when replicated over tp
    expert: bool


@dataclass(frozen=True)
class ModelState:
    """The model's parameters grouped as the run shards and places them."""
    layers: list[list[Tensor]]  # per decoder layer
    embeddings: list[Tensor]
    head: list[Tensor]  # final norm and LM head (and whatever follows the layers)
    tied: bool
    parameters: int

    @classmethod
    def of(cls, model: nn.Module) -> "ModelState":
        layers = list(decoder_layers(model))
        expert_ids = {id(p) for block in moe_blocks(model) for p in block.experts.parameters()}
        try:
            styles = layer_styles(tensor_parallel_parts(model))
        except ValueError:  # no usable TP plan: validation refuses tp > 1 for this model
            styles = [{} for _ in layers]
        per_layer = []
        for layer, style in zip(layers, styles):
            split = {name: dim for module, module_style in style.items()
                     for name, dim in _split_dims(module_style, module).items()}
            per_layer.append([Tensor(tuple(param.shape), split.get(name), id(param) in expert_ids)
                              for name, param in layer.named_parameters()])
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        embedding = embeddings(model)
        embedding_ids = {id(p) for p in embedding.parameters()} if embedding is not None else set()
        head_module = lm_head(model)
        vocab_ids = embedding_ids | ({id(p) for p in head_module.parameters()} if head_module is not None else set())
        first, last = [], []
        for param in model.parameters():
            if id(param) in in_layers:
                continue
            tensor = Tensor(tuple(param.shape), 0 if id(param) in vocab_ids else None, False)
            (first if id(param) in embedding_ids else last).append(tensor)
        tied = has_tied_embeddings(model)
        return cls(layers=per_layer, embeddings=first, head=last, tied=tied,
                   parameters=sum(p.numel() for p in model.parameters()))


def _split_dims(style: ParallelStyle, module: str) -> dict[str, int]:
    """The parameters (dotted names in the layer) that `style` on sub-module `module` splits over
    tp, and the dimension each is split along (parallel/tensor_parallel.py's styles)."""
    prefix = f"{module}." if module else ""
    if isinstance(style, ColwiseParallel):
        return {f"{prefix}weight": 0, f"{prefix}bias": 0}
    if isinstance(style, RowwiseParallel):
        return {f"{prefix}weight": 1}
    if isinstance(style, LocalParameters):
        return {f"{prefix}{name}": placement.dim for name, placement in style.placements.items()
                if isinstance(placement, Shard)}
    if isinstance(style, Styles):
        return {name: dim for inner in style.styles for name, dim in _split_dims(inner, module).items()}
    return {}


@dataclass(frozen=True)
class Sharding:
    tp: int
    ep: int
    dp_shard: int  # FSDP shards of dense parameters

    def local_numel(self, tensor: Tensor) -> int:
        """Elements of this rank's FSDP shard of `tensor` (padded, as FSDP2 pads dim 0)."""
        shape = list(tensor.shape)
        if tensor.tp_dim is not None and self.tp > 1:
            shape[tensor.tp_dim] //= self.tp
        shards = self.dp_shard
        if tensor.expert:
            shape[0] //= self.ep
            shards = self.dp_shard // self.ep
            if shape[0] < shards and len(shape) > 1:  # parallel/fsdp.py's _expert_placement
                shape[0], shape[1] = shape[1], shape[0]
        if not shape:
            return 1
        return math.ceil(shape[0] / shards) * math.prod(shape[1:])

    def gathered_numel(self, tensor: Tensor) -> int:
        """Elements of `tensor` FSDP gathers on this rank (its tensor- and expert-parallel part)."""
        numel = math.prod(tensor.shape)
        if tensor.tp_dim is not None and self.tp > 1:
            numel //= self.tp
        return numel // self.ep if tensor.expert else numel


@dataclass(frozen=True)
class StateBytes:
    param: int
    grad: int  # 0 in a prediction whose peak comes before any gradient exists
    optimizer: int
    gathered: int  # FSDP's unsharded copies in the compute dtype at the step's peak

    @property
    def total(self) -> int:
        return self.param + self.grad + self.optimizer + self.gathered


def rank_layers(num_layers: int, pp: int, schedule: str | None, stages_per_rank: int, rank: int) -> tuple[list[int], bool, bool]:
    """Decoder layer indices the pp rank holds, and whether it holds the embeddings / the head."""
    if pp == 1:
        return list(range(num_layers)), True, True
    names = stage_module_names(num_layers, pp * stages_per_rank, None)
    owned = [name for stage in stage_ids_for_rank(schedule, pp, stages_per_rank, rank) for name in names[stage]]
    layers = [i for i in range(num_layers) if layer_name(i) in owned]
    return layers, EMBEDDINGS in owned, LM_HEAD in owned


def state_bytes(state: ModelState, sharding: Sharding, layer_ids: list[int], first: bool, last: bool,
                compute_bytes: int, pipelined: bool) -> StateBytes:
    """This rank's state for the layers and ends it holds."""
    units = [state.layers[i] for i in layer_ids]
    root = (state.embeddings if first else []) + (state.head if last else [])
    if last and state.tied and not first:  # the last stage's head is its own copy of the embedding
        root = root + state.embeddings
    local = sum(sharding.local_numel(t) for unit in units + [root] for t in unit)
    gathered_units = [sum(sharding.gathered_numel(t) for t in unit) for unit in units]
    # Layers gathered at once: every one of them under pipeline parallel (kept between
    # microbatches), else the running one and the prefetched next one, and in backward the
    # running layer's unsharded gradients.
    held = sum(gathered_units) if pipelined else sum(sorted(gathered_units)[-2:]) + max(gathered_units, default=0)
    gathered = (held + sum(sharding.gathered_numel(t) for t in root)) * compute_bytes
    return StateBytes(param=local * FP32, grad=local * FP32, optimizer=2 * local * FP32, gathered=gathered)
