"""The one place that knows how a Hugging Face causal LM is put together.

Everything else asks this module for a model's parts (embeddings, decoder layers, final norm,
head, rotary embedding, MoE blocks and their routers) instead of probing attributes itself, so
teaching the harness a new family's layout is an edit here and nowhere else. `parallel` and
`moe` stay model-agnostic: the harness hands them the parts they work on.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from parallel.fsdp import layers_sharing_parameters
from parallel.tensor_parallel import TensorParallelParts

# Routed-expert counts, by the config field each family uses.
_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# Experts each token is routed to, by the config field each family uses.
_TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "moe_top_k", "top_k", "num_experts_per_token")
# The router aux loss's weight, by the config field each family uses (JetMoE: aux_loss_coef,
# DBRX: moe_loss_weight).
_AUX_LOSS_COEF_FIELDS = ("router_aux_loss_coef", "aux_loss_coef", "moe_loss_weight")
# Final norm of the base model, by family naming (Llama-style first; LFM2 calls its final norm
# `embedding_norm`).
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "norm_f", "ln_f", "embedding_norm", "final_layer_norm",
                     "final_norm", "ln_out")
# The module that turns a block's input into its top-k routing: `gate` (Qwen, Mixtral,
# DeepSeek) or `router` (GPT-OSS, Llama 4).
_ROUTER_NAMES = ("gate", "router")


@dataclass(frozen=True)
class MoEBlock:
    """A sparse MoE block: its experts module and the router that feeds it (None if unnamed)."""
    experts: nn.Module
    router: nn.Module | None


def _field_values(config: PretrainedConfig, keys: tuple[str, ...]) -> Iterator:
    """The values of `keys` in the config, then in its nested configs (DBRX keeps its experts'
    fields in `ffn_config`); None where a config lacks one. Lazy: callers take the first they
    want, and reading a field past it may raise (per-layer fields of heterogeneous configs)."""
    yield from (getattr(config, key, None) for key in keys)
    for name in getattr(config, "sub_configs", {}):
        sub = getattr(config, name, None)
        if isinstance(sub, PretrainedConfig):
            yield from (getattr(sub, key, None) for key in keys)


def layer_configs(config: PretrainedConfig) -> list[PretrainedConfig]:
    """Each decoder layer's config: a per-layer config (Gemma 4's head_dim and key/value heads,
    Dots 3's sliding-window heads) refuses to answer those fields globally."""
    if getattr(config, "is_heterogeneous", False):
        return list(config.per_layer_config)
    return [config] * config.num_hidden_layers


def expert_count(config: PretrainedConfig) -> int:
    """Routed experts per MoE layer; 0 for a dense model."""
    return int(next((value for value in _field_values(config, _EXPERT_COUNT_FIELDS) if value), 0))


class SkipLayer(nn.Module):
    """Stands in for a part a pipeline stage does not own: returns its input unchanged.

    It carries the replaced layer's plain attributes (`attention_type`, `block_type`, ...), which
    some families' forwards read from every layer to choose masks or caches."""

    def __init__(self, replaced: nn.Module | None = None) -> None:
        super().__init__()
        for key, value in vars(replaced or nn.Module()).items():
            if not key.startswith("_") and isinstance(value, (str, int, float, bool)):
                setattr(self, key, value)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class TupleSkipLayer(SkipLayer):
    """For families whose forward reads a layer's output as `layer_outputs[0]`."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor]:
        return (hidden_states,)


def experts_per_token(config: PretrainedConfig) -> int:
    """Routed experts per token (top-k); 0 for a dense model."""
    return int(next((value for value in _field_values(config, _TOP_K_FIELDS) if value), 0))


def aux_loss_coefficient(config: PretrainedConfig) -> float:
    """The weight of HF's router aux loss in the training loss."""
    coefficient = next((value for value in _field_values(config, _AUX_LOSS_COEF_FIELDS) if value is not None), None)
    if coefficient is not None:
        return float(coefficient)
    raise ValueError(f"{config.model_type}: no router aux loss coefficient (one of {_AUX_LOSS_COEF_FIELDS})")


def router_aux_loss_function(model: nn.Module) -> Callable | None:
    """The family's own switch loss (`load_balancing_loss_func` of its modeling module), which its
    forward adds with `output_router_logits`; None for a family whose forward has none."""
    return getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)


def training_randomness(config: PretrainedConfig) -> dict[str, float]:
    """Config fields > 0 that make the training forward draw random numbers (dropout, router and
    input jitter): those draws differ between ranks and microbatches, so such runs match
    another layout in distribution only."""
    return {key: value for key, value in config.to_dict().items()
            if isinstance(value, float) and value > 0
            and ("dropout" in key or "pdrop" in key or key.endswith("jitter_noise"))}


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack under the LM head (`model.model` for most families)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    # `get_decoder` answers the causal LM itself (Llama 4) or its head (ModernBERT decoder) for
    # some families; their base model is where the layers are.
    if decoder is None or decoder is model or not any(True for _ in decoder.children()):
        decoder = getattr(model, "base_model", model)
    if decoder is model:
        decoder = getattr(model, "model", model)
    return decoder


def decoder_layers(model: nn.Module) -> nn.ModuleList | nn.ModuleDict:
    """The container of transformer blocks: the base model's layer list, or for a pipeline stage
    the layers it owns in a ModuleDict keyed by their index in the whole model."""
    layers = layer_list(model)
    if any(isinstance(layer, SkipLayer) for layer in layers):
        return nn.ModuleDict({str(i): layer for i, layer in enumerate(layers) if not isinstance(layer, SkipLayer)})
    return layers


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The base model's whole list of decoder layers (pass-throughs included in a pipeline stage)."""
    inner = base_model(model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        count = getattr(model.config, "num_hidden_layers", None)
        candidates = [child for child in inner.children() if isinstance(child, nn.ModuleList) and len(child) == count]
        layers = candidates[0] if len(candidates) == 1 else None
    if layers is None:
        # Name the lists it has instead: BLT's several stacks (byte encoder, patch transformer,
        # byte decoder) are not one list of decoder layers.
        lists = [name for name, child in inner.named_modules() if isinstance(child, nn.ModuleList)]
        outer = [name for name in lists if not any(name.startswith(other + ".") for other in lists)]
        raise ValueError(f"{type(model).__name__}: no decoder layers found (expected one layer list of "
                         f"num_hidden_layers blocks in {type(inner).__name__}; it has "
                         f"{', '.join(outer) or 'none'})")
    return layers


def skip_layer_for(model: nn.Module) -> type[SkipLayer]:
    """The pass-through that matches what the family's forward expects back from a layer: the
    hidden states (`hidden_states = layer(...)`) or a tuple led by them (`out = layer(...)`, then
    `hidden_states = out[0]`). Raises ValueError for any other use of a layer's output."""
    loop = _layer_loop(model, _base_forward_ast(model))
    layer_names = {node.id for node in ast.walk(loop.target) if isinstance(node, ast.Name)}
    assignments = [(_assigned_name(node), node.value) for node in ast.walk(loop) if isinstance(node, ast.Assign)]
    outputs = {name for name, value in assignments
               if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in layer_names}
    if outputs == {"hidden_states"}:
        return SkipLayer
    if len(outputs) == 1 and any(name == "hidden_states" and _is_first_item_of(value, *outputs)
                                 for name, value in assignments):
        return TupleSkipLayer
    raise ValueError(f"{type(model).__name__}: its forward unpacks each layer's output in a way a pipeline "
                     "stage cannot stand in for; use parallel.pp=1")


def _assigned_name(node: ast.Assign) -> str | None:
    target = node.targets[0]
    return target.id if len(node.targets) == 1 and isinstance(target, ast.Name) else None


def _is_first_item_of(value: ast.expr, name: str | None) -> bool:
    """`value` is `name[0]`."""
    return (isinstance(value, ast.Subscript) and isinstance(value.value, ast.Name) and value.value.id == name
            and isinstance(value.slice, ast.Constant) and value.slice.value == 0)


def _final_norm_name(model: nn.Module) -> str | None:
    inner = base_model(model)
    return next((name for name in _FINAL_NORM_NAMES if isinstance(getattr(inner, name, None), nn.Module)), None)


def final_norm(model: nn.Module) -> nn.Module | None:
    name = _final_norm_name(model)
    norm = getattr(base_model(model), name) if name else None
    return None if isinstance(norm, SkipLayer) else norm


def remove_embeddings(model: nn.Module) -> None:
    """Drops the token embeddings (a later pipeline stage receives hidden states instead)."""
    inner, embedding = base_model(model), model.get_input_embeddings()
    name = next(n for n, child in inner.named_children() if child is embedding)
    setattr(inner, name, None)


def remove_head(model: nn.Module) -> None:
    """Drops every part of the causal LM outside its base model (the LM head under any name:
    `lm_head`, BioGPT's `output_projection`; ModernBERT's prediction head and decoder): an
    earlier pipeline stage returns hidden states."""
    inner = base_model(model)
    for name, child in list(model.named_children()):
        if child is not inner and inner not in set(child.modules()) and any(True for _ in child.parameters()):
            setattr(model, name, None)


def has_tied_embeddings(model: nn.Module) -> bool:
    """Whether the LM head is the input embedding's weight (tie_word_embeddings and its aliases)."""
    head, embedding = lm_head(model), embeddings(model)
    return head is not None and embedding is not None and head.weight is embedding.weight


class InputSideStandIn(nn.Module):
    """Stands in, on a pipeline stage without the embeddings, for a part that works on the token
    embeddings (GPT-2's position table, BLOOM's embedding norm): whatever it returns is replaced
    by the received hidden states at the stage's first module, so only its shape matters. A table
    (an `nn.Embedding`) gives zero rows for its indices; anything else returns its input."""

    def __init__(self, replaced: nn.Module) -> None:
        super().__init__()
        self.embedding_dim = replaced.embedding_dim if isinstance(replaced, nn.Embedding) else None

    def forward(self, first: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.embedding_dim is None:
            return first
        return torch.zeros(*first.shape, self.embedding_dim, device=first.device)


def base_parts_around_layers(model: nn.Module) -> tuple[list[str], list[str]]:
    """Children of the base model a pipeline stage must place, besides the embeddings, layers and
    rotary embedding (the final norm, and every part that holds parameters), split by where the
    base model's forward calls them: before its layer loop (on the token embeddings: GPT-2's
    position table, BLOOM's embedding norm) or after it (the final norm, whatever its name).
    Raises ValueError for a part called on both sides of the loop, in it, or not by the forward."""
    inner, layers, norm = base_model(model), layer_list(model), final_norm(model)
    skipped = {embeddings(model), layers, rotary_embedding(model)}
    forward = _base_forward_ast(model)
    loop = _layer_loop(model, forward)
    calls: dict[str, list[int]] = {}
    for node in ast.walk(forward):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"):
            calls.setdefault(node.func.attr, []).append(node.lineno)
    before, after = [], []
    for name, child in inner.named_children():
        if child in skipped or (child is not norm and not any(True for _ in child.parameters())):
            continue
        lines = calls.get(name, [])
        if lines and all(line < loop.lineno for line in lines):
            before.append(name)
        elif lines and all(line > loop.end_lineno for line in lines):
            after.append(name)
        else:
            where = "inside or on both sides of its layer loop" if lines else "only through other code"
            raise ValueError(f"{type(model).__name__}: its forward runs {name} {where}, which pipeline stages "
                             "cannot split; use parallel.pp=1")
    return before, after


def _base_forward_ast(model: nn.Module) -> ast.Module:
    return ast.parse(textwrap.dedent(inspect.getsource(type(base_model(model)).forward)))


def _layer_loop(model: nn.Module, forward: ast.Module) -> ast.For:
    """The loop over its layers in `forward` (the base model's, parsed); ValueError unless there
    is exactly one."""
    inner, layers = base_model(model), layer_list(model)
    loops = [node for node in ast.walk(forward)
             if isinstance(node, ast.For) and _iterates_layers(node, inner, layers)]
    if len(loops) != 1:
        raise ValueError(f"{type(model).__name__}: its forward does not run its layers in one loop; use parallel.pp=1")
    return loops[0]


def _iterates_layers(loop: ast.For, inner: nn.Module, layers: nn.ModuleList) -> bool:
    """`for layer in self.layers[...]` / `enumerate(self.layers)`: the loop over `layers`."""
    return any(isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
               and getattr(inner, node.attr, None) is layers for node in ast.walk(loop.iter))


def check_pipeline_support(model: nn.Module) -> None:
    """Raises ValueError (one line: what and the fix) for a model pipeline stages cannot carry
    (`model` may be on the meta device)."""
    config = model.config
    if getattr(config, "hidden_size_per_layer_input", None):
        raise ValueError(f"{config.model_type}: per-layer inputs are computed from the token ids, which only the "
                         "first pipeline stage receives; use parallel.pp=1")
    if getattr(config, "num_kv_shared_layers", 0):
        raise ValueError(f"{config.model_type}: its last {config.num_kv_shared_layers} layers reuse keys and "
                         "values that earlier layers hand them within the forward, which pipeline stages do not "
                         "carry; use parallel.pp=1")
    inner = base_model(model)
    container = next((name for name, child in inner.named_children() if embeddings(model) in set(child.modules())), None)
    if container is not None and getattr(inner, container) is not embeddings(model):
        raise ValueError(f"{config.model_type}: its token embeddings sit inside {container} with other parts, which "
                         "pipeline stages do not split; use parallel.pp=1")
    # Each stage would train its own copy of a block several layers share (Zamba's transformer).
    layers = list(layer_list(model))
    shared = next((group for group in layers_sharing_parameters(layers) if len(group) > 1), None)
    if shared is not None:
        indices = " and ".join(str(next(i for i, layer in enumerate(layers) if layer is member)) for member in shared)
        raise ValueError(f"{config.model_type}: decoder layers {indices} share parameters, which pipeline stages "
                         "cannot split; use parallel.pp=1")
    # A part after the layers runs on the last stage only; earlier stages pass their hidden states
    # through in its place, which is right for a norm (its parameters are vectors) and nothing else.
    _, after = base_parts_around_layers(model)
    not_norms = [name for name in after if any(p.dim() > 1 for p in getattr(inner, name).parameters())]
    if not_norms:
        raise ValueError(f"{config.model_type}: the base model has parts after its layers that are not norms "
                         f"({', '.join(not_norms)}), which pipeline stages cannot pass through; use parallel.pp=1")
    skip_layer_for(model)


def rotary_embedding(model: nn.Module) -> nn.Module | None:
    return getattr(base_model(model), "rotary_emb", None)


def embeddings(model: nn.Module) -> nn.Module | None:
    try:
        return model.get_input_embeddings()
    except NotImplementedError:  # a pipeline stage without them: BioGPT's lookup raises rather than answer None
        return None


def lm_head(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings()


def _is_experts(module: nn.Module) -> bool:
    # transformers v5 expert layout: one fused tensor per projection over all experts, the first
    # one gated (`gate_up_proj`) or not (`up_proj`, e.g. Nemotron-H).
    return hasattr(module, "down_proj") and (hasattr(module, "gate_up_proj") or hasattr(module, "up_proj"))


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


def tensor_parallel_parts(model: nn.Module, expert_parallel: bool = False) -> TensorParallelParts:
    """What tensor parallel shards: the family's TP plan (as transformers declares it, relative to
    the base model) and the parts it names or that sequence and vocabulary parallel touch;
    `expert_parallel`: whether expert parallel shards the routed experts afterwards."""
    layers = decoder_layers(model)
    return TensorParallelParts(
        expert_parallel=[block.experts for block in moe_blocks(model)] if expert_parallel else (),
        family=model.config.model_type, plan=getattr(model.config, "base_model_tp_plan", None),
        base=base_model(model), layers=list(layers.values() if isinstance(layers, nn.ModuleDict) else layers),
        routed=[module for block in moe_blocks(model) for module in (block.experts, block.router)
                if module is not None],
        embeddings=embeddings(model), final_norm=final_norm(model), head=lm_head(model))


def describe(module: nn.Module) -> str:
    """What a model or pipeline stage holds, e.g. 'embed_tokens, layers 0-1, norm, lm_head'."""
    parts = ["embed_tokens"] if embeddings(module) is not None else []
    layers = decoder_layers(module)
    if len(layers):
        ids = [int(k) for k in layers.keys()] if isinstance(layers, nn.ModuleDict) else list(range(len(layers)))
        parts.append(f"layers {ids[0]}-{ids[-1]}" if len(ids) > 1 else f"layer {ids[0]}")
    parts += [name for name, part in (("norm", final_norm(module)), ("lm_head", lm_head(module))) if part is not None]
    return ", ".join(parts)
