"""Activation memory of one microbatch, per decoder layer and AC mode, from fake-tensor steps.

The model's own forward and backward run on fake tensors (parallel/ac_budget.py's `simulate`)
once per AC mode, not on the whole model but on its shortest prefix that holds every distinct
kind of decoder layer (same class, parameter shapes and attention type): one layer for Llama,
the dense layers and the first MoE layer for DeepSeek-V3, a whole period of a hybrid's layer
pattern. Every other layer reuses its kind's measurement, so a 70B model costs what a few of its
layers cost. The step's remainder (embeddings, logits, loss, the last backward's transients) is
the prefix's simulated peak minus its layers' kept bytes.

Kept bytes are linear in the rows of a microbatch (every activation of a layer has the batch
dimension), so one row is measured and scaled.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from harness.loss import token_loss_sum
from harness.model_parts import decoder_layers
from harness.models import build_meta_model
from parallel.ac_budget import BUDGET_MODES, LayerCost, StepShape, simulate

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ActivationProfile:
    """Per-row activation bytes of the whole model's layers, from the measured kinds."""
    layers: list[LayerCost]  # per decoder layer of the whole model, per mode, for one row
    remainder_bytes: int  # per row: the step's peak beyond the layers' kept bytes (logits, loss, ...)
    kinds: int  # distinct layer kinds measured

    def kept(self, layer_modes: list[str] | tuple[str, ...], layer_ids: list[int], rows: float) -> float:
        return rows * sum(self.layers[i].kept_bytes[layer_modes[i]] for i in layer_ids)

    def recompute_fraction(self, layer_modes: list[str] | tuple[str, ...]) -> float:
        """Recomputed forward cost over the whole forward's (1 = everything again, as full AC)."""
        full = sum(cost.recompute_cost["full"] for cost in self.layers)
        return sum(cost.recompute_cost[mode] for cost, mode in zip(self.layers, layer_modes)) / max(full, 1e-9)


def layer_kind(layer: nn.Module) -> tuple:
    """What decides a layer's activations: its class, its parameters' names and shapes, and the
    attention it runs (sliding or full: same parameters, other masks and kernels)."""
    shapes = tuple((name, tuple(p.shape)) for name, p in layer.named_parameters())
    attention = getattr(layer, "attention_type", None) or getattr(getattr(layer, "self_attn", None),
                                                                   "sliding_window", None)
    return type(layer).__name__, shapes, attention


def _prefix_config(config: PretrainedConfig, count: int) -> PretrainedConfig:
    """`config` cut to its first `count` decoder layers, per-layer lists (layer_types, ...) cut too."""
    layers = config.num_hidden_layers
    prefix = copy.deepcopy(config)
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == layers and hasattr(prefix, key):
            setattr(prefix, key, value[:count])
    prefix.num_hidden_layers = count
    return prefix


def measure_profile(model: nn.Module, seq_len: int, dtype: torch.dtype, progress: Progress) -> ActivationProfile:
    """Kept bytes and recompute cost of every layer of `model` (meta device) per AC mode, for one
    row of `seq_len` tokens in `dtype`, measured on fake tensors with CPU kernels."""
    layers = list(decoder_layers(model))
    kinds = [layer_kind(layer) for layer in layers]
    first = {}
    for index, kind in enumerate(kinds):
        first.setdefault(kind, index)
    count = max(first.values()) + 1
    prefix = build_meta_model(_prefix_config(model.config, count))
    prefix_layers = list(decoder_layers(prefix))
    assert [layer_kind(layer) for layer in prefix_layers] == kinds[:count], "the prefix has the model's layers"
    shape = StepShape(rows=1, seq_len=seq_len, dtype=dtype, device_type="cpu")
    runs = {}
    for mode in BUDGET_MODES:
        progress(f"measuring activations: {count} of {len(layers)} layers ({len(first)} kinds), AC {mode}, "
                 f"1 x {seq_len} tokens on fake tensors")
        runs[mode] = simulate(prefix, prefix_layers, [mode] * count, shape, token_loss_sum, price_ops=mode == "none")
    prices = runs["none"].recompute
    measured = [LayerCost(kept_bytes={mode: runs[mode].kept_bytes[i] for mode in BUDGET_MODES},
                          recompute_cost={"none": 0.0, "selective": prices.selective[i], "full": prices.full[i]})
                for i in range(count)]
    remainder = max(runs[mode].peak_bytes - sum(runs[mode].kept_bytes) for mode in BUDGET_MODES)
    return ActivationProfile(layers=[measured[first[kind]] for kind in kinds], remainder_bytes=remainder,
                             kinds=len(first))
