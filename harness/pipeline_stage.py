"""A pipeline stage of a Hugging Face causal LM: a pruned copy of the whole model that runs
the family's own forward.

A stage keeps the model's object tree, so its parameter names are exactly the whole model's
(`model.layers.5.mlp.up_proj.weight`, `lm_head.weight`), and it runs HF's own forward, so
whatever a family does around its layers (embedding multipliers, rotary tables per layer type,
mask kinds, logit scales and soft-caps) is not re-implemented here:

- layers a stage does not own become parameter-free pass-throughs (`model_parts.SkipLayer`), and
  a final norm it does not own becomes one too; other parts of the base model go with the
  embeddings when they come before the layers (GPT-2's position table, BLOOM's embedding norm:
  other stages get a stand-in of the right shape) and with the final norm when they come after;
- the first stage takes token ids; a later stage hands HF's forward placeholder embeddings of
  zeros and swaps the hidden states it received in at the input of its first module, so
  post-embedding scaling is not applied twice;
- the last stage runs the causal LM's forward (head and logit processing) and returns logits;
  the others run the base model and return its last hidden state;
- with HF's router aux loss on, every stage also hands on the router statistics of the layers
  so far (`moe.balance.router_statistics`), from which the last stage's loss takes the aux loss
  of the whole model.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from harness import model_parts
from moe.balance import router_statistics
from parallel.context_parallel import SequenceShard
from parallel.pipeline import PipelinePlan, stage_ids_for_rank
from parallel.pipeline_split import EMBEDDINGS, FINAL_NORM, LM_HEAD, layer_name
from parallel.tied_stages import TiedAcrossStages, first_last_stage_group


@dataclass(frozen=True)
class _StageRole:
    takes_ids: bool  # owns the embeddings
    returns_logits: bool  # owns the head
    entry: str  # where received hidden states enter: "layer:<i>", "base:<final norm's name>" or "head"
    router_stats: tuple[int, int] | None  # (experts, top-k) when stages carry router statistics
    sequence_shards: int  # tensor parallel's sequence parallel: received hidden states hold 1/this of each sequence


def _entry_module(stage: nn.Module, entry: str) -> nn.Module:
    kind, _, name = entry.partition(":")
    if kind == "layer":
        return model_parts.layer_list(stage)[int(name)]
    return getattr(model_parts.base_model(stage), name) if kind == "base" else model_parts.lm_head(stage)


def _swap_in(received: torch.Tensor, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if args:
        return (received, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": received}


def _stage_forward(self: nn.Module, inputs: torch.Tensor,
                   received_stats: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    role: _StageRole = self._pipeline_stage_role
    if role.takes_ids:
        kwargs, hook = {"input_ids": inputs}, None
    else:
        # HF's forward reads positions and the mask from the placeholder: the whole sequence.
        rows, seq, *rest = inputs.shape
        kwargs = {"inputs_embeds": inputs.new_zeros(rows, seq * role.sequence_shards, *rest)}
        # Ahead of the entry module's own hooks (tensor parallel's input layouts), which then
        # see the received hidden states.
        hook = _entry_module(self, role.entry).register_forward_pre_hook(
            lambda module, args, kw: _swap_in(inputs, module, args, kw), with_kwargs=True, prepend=True)
    if self._context_shard is not None:  # the global positions of this rank's tokens
        kwargs.update(self._context_shard.model_inputs(inputs.shape[0], None, inputs.device))
    try:
        if role.returns_logits:
            outputs = type(self).forward(self, **kwargs, use_cache=False)
            result = outputs.logits
        else:
            outputs = model_parts.base_model(self)(**kwargs, use_cache=False)
            result = outputs.last_hidden_state
    finally:
        if hook is not None:
            hook.remove()
    if role.router_stats is None:
        return result
    stats = router_statistics(tuple(outputs.router_logits or ()), *role.router_stats).to(result.device)
    if received_stats is None:
        # A leaf that asks for gradients: the schedule sends every stage output's gradient back.
        received_stats = torch.zeros_like(stats, requires_grad=True)
    return result, received_stats + stats


def _prune(causal_lm: nn.Module, module_names: list[str], sequence_shards: int) -> _StageRole:
    owned = set(module_names)
    inner = model_parts.base_model(causal_lm)
    # Parts around the layers go with the embeddings (before them) or the final norm (after).
    before, after = model_parts.base_parts_around_layers(causal_lm)
    if EMBEDDINGS not in owned:
        for name in before:
            setattr(inner, name, model_parts.InputSideStandIn(getattr(inner, name)))
    if FINAL_NORM not in owned:
        for name in after:
            setattr(inner, name, model_parts.SkipLayer())
    layers = model_parts.layer_list(causal_lm)
    skip = model_parts.skip_layer_for(causal_lm)
    kept = [i for i in range(len(layers)) if layer_name(i) in owned]
    for i in range(len(layers)):
        if i not in kept:
            layers[i] = skip(layers[i])
    if EMBEDDINGS not in owned:
        model_parts.remove_embeddings(causal_lm)
    if LM_HEAD not in owned:
        model_parts.remove_head(causal_lm)
    entry = f"layer:{kept[0]}" if kept else f"base:{after[0]}" if FINAL_NORM in owned and after else "head"
    assert inner is model_parts.base_model(causal_lm)
    config = causal_lm.config
    stats = ((model_parts.expert_count(config), model_parts.experts_per_token(config))
             if getattr(config, "output_router_logits", False) else None)
    return _StageRole(takes_ids=EMBEDDINGS in owned, returns_logits=LM_HEAD in owned, entry=entry, router_stats=stats,
                      sequence_shards=sequence_shards)


def stage_builder(model: nn.Module, sequence_shards: int = 1,
                  context_shard: SequenceShard | None = None) -> Callable[[list[str]], nn.Module]:
    """`module_names -> stage`: each stage a pruned deep copy of `model` (cheap on meta).
    `sequence_shards`: the tp degree, over which sequence parallel splits what stages hand on;
    under context parallel, `context_shard` says which tokens of each sequence the stages see."""
    model_parts.check_pipeline_support(model)

    def build(module_names: list[str]) -> nn.Module:
        stage = copy.deepcopy(model)
        stage._pipeline_stage_role = _prune(stage, module_names, sequence_shards)
        stage._context_shard = context_shard
        # An instance attribute: the class (and FSDP's subclass of it) keeps HF's own forward,
        # which `_stage_forward` calls.
        stage.forward = types.MethodType(_stage_forward, stage)
        return stage

    return build


def tied_embedding_copies(model: nn.Module, pipeline: PipelinePlan, world: DeviceMesh, schedule: str,
                          stages_per_rank: int) -> TiedAcrossStages | None:
    """For a model whose head is its input embedding: this rank's copies of that weight (first
    stage: the embedding, last stage: the head), made equal. None for an untied model. A
    collective: every rank calls it."""
    if not model_parts.has_tied_embeddings(model):
        return None
    pp = world.size(0)
    last_stage = pp * stages_per_rank - 1
    last_rank = next(r for r in range(pp) if last_stage in stage_ids_for_rank(schedule, pp, stages_per_rank, r))
    stages = pipeline.stage_modules
    tied = TiedAcrossStages(first=model_parts.embeddings(stages[0]).weight if pipeline.has_first_stage else None,
                            last=model_parts.lm_head(stages[-1]).weight if pipeline.has_last_stage else None,
                            group=first_last_stage_group(world, last_rank))
    tied.copy_first_to_last()
    return tied


def carried_examples(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """Meta examples of what stages hand on besides hidden states: the router statistics when
    HF's router aux loss is on, else nothing."""
    config = model.config
    if not getattr(config, "output_router_logits", False):
        return ()
    experts = model_parts.expert_count(config)
    return (torch.empty(2, experts + 1, dtype=torch.float32, device="meta", requires_grad=True),)
