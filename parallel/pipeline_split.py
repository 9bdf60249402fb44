"""Split a Hugging Face causal LM into pipeline stage modules that keep canonical names.

A stage module is a pruned copy of the whole model: the decoder layers it does not own are
gone (`model.layers` becomes a ModuleDict keyed by the original layer index), and so are the
embeddings, final norm and lm_head unless it is the first / last stage. Its parameter names are
therefore exactly the full model's (`model.layers.5.mlp.up_proj.weight`, `lm_head.weight`), so
materialization and checkpoints do not depend on the pipeline layout.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

EMBEDDINGS = "model.embed_tokens"
FINAL_NORM = "model.norm"
LM_HEAD = "lm_head"
LAYER_PREFIX = "model.layers."

LayerSpec = list[int] | list[list[str]] | None


def layer_name(index: int) -> str:
    return f"{LAYER_PREFIX}{index}"


def model_order(num_layers: int) -> list[str]:
    """Every module a stage can own, in the order activations flow through them."""
    return [EMBEDDINGS, *(layer_name(i) for i in range(num_layers)), FINAL_NORM, LM_HEAD]


def stage_module_names(num_layers: int, num_stages: int, layers_per_stage: LayerSpec) -> list[list[str]]:
    """The module FQNs each stage owns (the rotary embedding is added to stages with layers).

    `layers_per_stage`: None spreads the layers evenly, the remainder going to the first
    stages; a list of ints gives each stage's layer count; a list of name lists is taken as is.
    Raises ValueError naming `parallel.pp_layers_per_stage` when a layout is impossible.
    """
    if layers_per_stage and isinstance(layers_per_stage[0], list):
        return _checked_explicit(num_layers, num_stages, layers_per_stage)
    counts = layers_per_stage or _even_counts(num_layers, num_stages)
    _check_counts(num_layers, num_stages, counts)
    stages, start = [], 0
    for count in counts:
        stages.append([layer_name(i) for i in range(start, start + count)])
        start += count
    stages[0].insert(0, EMBEDDINGS)
    stages[-1].extend([FINAL_NORM, LM_HEAD])
    return stages


def _even_counts(num_layers: int, num_stages: int) -> list[int]:
    if num_stages > num_layers:
        raise ValueError(f"parallel.pp: {num_stages} pipeline stages (pp x stages per rank) for {num_layers} "
                         f"decoder layers; lower parallel.pp or parallel.pp_stages_per_rank")
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def _check_counts(num_layers: int, num_stages: int, counts: list[int]) -> None:
    field = "parallel.pp_layers_per_stage"
    if len(counts) != num_stages:
        raise ValueError(f"{field}={counts}: {len(counts)} entries for {num_stages} stages "
                         f"(pp x stages per rank); give one layer count per stage")
    if sum(counts) != num_layers:
        raise ValueError(f"{field}={counts}: sums to {sum(counts)} but the model has {num_layers} decoder "
                         f"layers; make the counts add up to {num_layers}")
    # A middle stage without layers would only pass its input through, which has no gradient
    # path of its own; the first and last stages still compute embeddings / norm + head.
    empty_middle = [s for s in range(1, num_stages - 1) if counts[s] < 1]
    if any(c < 0 for c in counts) or empty_middle:
        raise ValueError(f"{field}={counts}: every stage but the first and last needs at least one layer")


def _checked_explicit(num_layers: int, num_stages: int, names: list[list[str]]) -> list[list[str]]:
    field = "parallel.pp_layers_per_stage"
    if len(names) != num_stages:
        raise ValueError(f"{field}: {len(names)} module lists for {num_stages} stages (pp x stages per rank); "
                         f"give one list per stage")
    flat = [name for stage in names for name in stage]
    expected = model_order(num_layers)
    if flat != expected:
        unknown = sorted(set(flat) - set(expected))
        missing = [n for n in expected if n not in flat]
        detail = (f"unknown {unknown}" if unknown else f"missing {missing}" if missing
                  else "duplicated or out of order")
        raise ValueError(f"{field}: module lists must cover {EMBEDDINGS}, {LAYER_PREFIX}0..{num_layers - 1}, "
                         f"{FINAL_NORM}, {LM_HEAD} once each in model order ({detail})")
    empty_middle = [s for s in range(1, num_stages - 1) if not names[s]]
    if empty_middle or not names[0] or not names[-1]:
        raise ValueError(f"{field}: stage(s) {empty_middle or [0, num_stages - 1]} own no module; "
                         f"every stage needs at least one")
    return [list(stage) for stage in names]


class StageModule(nn.Module):
    """One pipeline stage: takes token ids (first stage) or hidden states, returns hidden states
    or logits (last stage). Parts it does not own are None and skipped."""

    def __init__(self, causal_lm: nn.Module, module_names: list[str]) -> None:
        super().__init__()
        owned = set(module_names)
        inner = causal_lm.model
        layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(inner.layers)
                                if layer_name(i) in owned})
        inner.layers = layers
        if EMBEDDINGS not in owned:
            inner.embed_tokens = None
        if FINAL_NORM not in owned:
            inner.norm = None
        if not layers:
            inner.rotary_emb = None
        self.model = inner
        self.lm_head = causal_lm.lm_head if LM_HEAD in owned else None
        self.config = causal_lm.config

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = self.model
        if inner.embed_tokens is not None:
            hidden = inner.embed_tokens(hidden)
        if len(inner.layers):
            # Every stage rebuilds positions, mask and rotary tables from the shape alone: the
            # batch is unpadded and packed from position 0, so nothing else needs to travel.
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            layer_ids = [int(index) for index in inner.layers]
            masks = _attention_masks(self.config, layer_ids, hidden, position_ids)
            position_embeddings = inner.rotary_emb(hidden, position_ids)
            for index, layer in zip(layer_ids, inner.layers.values()):
                hidden = layer(hidden, attention_mask=masks[_attention_type(self.config, index)],
                               position_ids=position_ids, position_embeddings=position_embeddings)
        if inner.norm is not None:
            hidden = inner.norm(hidden)
        if self.lm_head is not None:
            hidden = self.lm_head(hidden)
        return hidden


def _attention_type(config, index: int) -> str:
    """As the HF models pick it: per-layer `layer_types`, else the config's sliding window."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"


_MASK_BUILDERS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def _attention_masks(config, layer_ids: list[int], hidden: torch.Tensor,
                     position_ids: torch.Tensor) -> dict[str, object]:
    """One mask per attention type the stage's layers use (None lets SDPA run `is_causal`)."""
    kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids)
    kinds = {_attention_type(config, i) for i in layer_ids}
    return {kind: _MASK_BUILDERS[kind](**kwargs) for kind in kinds}


def split_model(model: nn.Module, module_names: list[list[str]], stage_ids: list[int]) -> list[StageModule]:
    """Stage modules for `stage_ids`, each a pruned deep copy of `model` (cheap on meta)."""
    if getattr(model.config, "tie_word_embeddings", False):
        raise ValueError("model.tie_word_embeddings=True: pipeline stages cannot share the embedding with "
                         "lm_head; use a model with untied embeddings or parallel.pp=1")
    return [StageModule(copy.deepcopy(model), module_names[s]) for s in stage_ids]
