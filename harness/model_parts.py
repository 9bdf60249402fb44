"""The one place that knows how a Hugging Face causal LM is put together.

Everything else asks this module for a model's parts (embeddings, decoder layers, final norm,
head, rotary embedding, MoE blocks and their routers) instead of probing attributes itself, so
teaching the harness a new family's layout is an edit here and nowhere else. `parallel` and
`moe` stay model-agnostic: the harness hands them the parts they work on.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

# Routed-expert counts, by the config field each family uses.
_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# Final norm of the base model, by family naming (Llama-style first).
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "norm_f", "ln_f")
# The module that turns a block's input into its top-k routing: `gate` (Qwen, Mixtral,
# DeepSeek) or `router` (GPT-OSS, Llama 4).
_ROUTER_NAMES = ("gate", "router")
# transformers v5 expert layout: one fused tensor per projection over all experts.
_EXPERT_PARAMS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class MoEBlock:
    """A sparse MoE block: its experts module and the router that feeds it (None if unnamed)."""
    experts: nn.Module
    router: nn.Module | None


def expert_count(config: PretrainedConfig) -> int:
    """Routed experts per MoE layer; 0 for a dense model."""
    for key in _EXPERT_COUNT_FIELDS:
        if getattr(config, key, None):
            return int(getattr(config, key))
    return 0


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack under the LM head (`model.model` for most families)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList | nn.ModuleDict:
    """The container of transformer blocks: the base model's layer list (a ModuleDict keyed by
    the original index in a pipeline stage)."""
    inner = base_model(model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        count = getattr(model.config, "num_hidden_layers", None)
        candidates = [child for child in inner.children() if isinstance(child, nn.ModuleList) and len(child) == count]
        layers = candidates[0] if len(candidates) == 1 else None
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found (expected a layer list of "
                         f"num_hidden_layers blocks in {type(inner).__name__})")
    return layers


def final_norm(model: nn.Module) -> nn.Module | None:
    inner = base_model(model)
    for name in _FINAL_NORM_NAMES:
        module = getattr(inner, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def rotary_embedding(model: nn.Module) -> nn.Module | None:
    return getattr(base_model(model), "rotary_emb", None)


def embeddings(model: nn.Module) -> nn.Module | None:
    return model.get_input_embeddings()


def lm_head(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings()


def _is_experts(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in _EXPERT_PARAMS)


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every MoE block's experts (the v5 fused layout) and router, in model order."""
    blocks = []
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, nn.Module) and _is_experts(experts):
            router = next((getattr(module, name) for name in _ROUTER_NAMES
                           if isinstance(getattr(module, name, None), nn.Module)), None)
            blocks.append(MoEBlock(experts, router))
    return blocks


def describe(module: nn.Module) -> str:
    """What a model or pipeline stage holds, e.g. 'embed_tokens, layers 0-1, norm, lm_head'."""
    parts = ["embed_tokens"] if embeddings(module) is not None else []
    layers = decoder_layers(module)
    if len(layers):
        ids = [int(k) for k in layers.keys()] if isinstance(layers, nn.ModuleDict) else list(range(len(layers)))
        parts.append(f"layers {ids[0]}-{ids[-1]}" if len(ids) > 1 else f"layer {ids[0]}")
    parts += [name for name, part in (("norm", final_norm(module)), ("lm_head", lm_head(module))) if part is not None]
    return ", ".join(parts)
