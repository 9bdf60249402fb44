"""A pipeline stage of a Hugging Face causal LM: a pruned copy of the whole model.

The decoder layers a stage does not own are gone (the layer list becomes a ModuleDict keyed by
the original layer index), and so are the embeddings, final norm and head unless it is the
first / last stage, so its parameter names are exactly the whole model's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from harness import model_parts
from parallel.pipeline_split import EMBEDDINGS, FINAL_NORM, LM_HEAD, layer_name


class StageModule(nn.Module):
    """One pipeline stage: takes token ids (first stage) or hidden states, returns hidden states
    or logits (last stage). Parts it does not own are None and skipped."""

    def __init__(self, causal_lm: nn.Module, module_names: list[str]) -> None:
        super().__init__()
        owned = set(module_names)
        inner = model_parts.base_model(causal_lm)
        inner.layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(model_parts.decoder_layers(causal_lm))
                                      if layer_name(i) in owned})
        if EMBEDDINGS not in owned:
            inner.embed_tokens = None
        if FINAL_NORM not in owned:
            inner.norm = None
        if not inner.layers:
            inner.rotary_emb = None
        self.model = inner
        self.lm_head = causal_lm.lm_head if LM_HEAD in owned else None
        self.config = causal_lm.config

    # The accessors HF models have, so the model-parts adapter reads a stage like a whole model.
    def get_decoder(self) -> nn.Module:
        return self.model

    def get_input_embeddings(self) -> nn.Module | None:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm_head

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


def stage_builder(model: nn.Module):
    """`module_names -> StageModule`: each stage a pruned deep copy of `model` (cheap on meta)."""
    if getattr(model.config, "tie_word_embeddings", False):
        raise ValueError("model.tie_word_embeddings=True: pipeline stages cannot share the embedding with "
                         "lm_head; use a model with untied embeddings or parallel.pp=1")

    def build(module_names: list[str]) -> StageModule:
        return StageModule(copy.deepcopy(model), module_names)

    return build
