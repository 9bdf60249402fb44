"""Hugging Face causal LMs: built-in tiny presets, local configs, meta-device construction.

Every layout starts from the same weights: those of a local checkpoint (`model.path` with
safetensors), or fresh ones for a seed, initialised module by module with a generator that
depends only on the seed and the module's name (harness/init_weights.py). Each rank fills its
own shards from the source (harness/materialize.py); `reference_model` builds the same weights
whole, in one process, for the tests to compare against.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMultimodalLM, PretrainedConfig

from harness.hf_checkpoint import HFCheckpoint, has_weights
from harness.init_weights import SeededInit
from harness.materialize import WeightSource, materialize
from harness.multimodal import language_model_config, language_model_state, multimodal_config

_TINY_ATTENTION = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       num_hidden_layers=4, vocab_size=256, max_position_embeddings=2048,
                       tie_word_embeddings=False)

PRESETS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", intermediate_size=128, **_TINY_ATTENTION),
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=128, moe_intermediate_size=32,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                      router_aux_loss_coef=0.001, **_TINY_ATTENTION),
    "mixtral": dict(model_type="mixtral", intermediate_size=32, num_local_experts=8,
                    num_experts_per_tok=2, router_aux_loss_coef=0.001, **_TINY_ATTENTION),
    "deepseek_v3": dict(model_type="deepseek_v3", intermediate_size=128, moe_intermediate_size=32,
                        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
                        topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.0,
                        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=16, **{**_TINY_ATTENTION, "num_key_value_heads": 4, "head_dim": 8}),
}


def load_config(preset: str | None, path: str | None, overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    """The HF config of a preset or of a local directory / config.json (never the network)."""
    if path:
        source = os.path.dirname(path) if path.endswith(".json") else path
        config = language_model_config(AutoConfig.from_pretrained(source, local_files_only=True))
    else:
        kwargs = dict(PRESETS[preset])
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    for key, value in (overrides or {}).items():
        try:
            setattr(config, key, value)
        except Exception as e:  # transformers' typed config fields raise huggingface_hub's own errors
            raise ValueError(f"model.overrides.{key}={value!r}: {error_reason(e)}") from None
    config.use_cache = False
    return config


def error_reason(error: Exception) -> str:
    """One line for an error from transformers: its first line, or for a typed config field the
    last (`Validation error for field 'x':` comes first, then why), with the error's type where
    the text alone is bare (a KeyError's is the key)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if isinstance(error, StrictDataclassError):
        return lines[-1]
    return lines[0] if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: {lines[0]}"


def build_meta_model(config: PretrainedConfig) -> nn.Module:
    """The model's modules with parameters on the meta device: parallelize first, allocate later.

    Parameters are fp32 whatever dtype the config records (a bf16 Hub checkpoint says bfloat16):
    they are the optimizer's master weights; on CUDA, FSDP's mixed precision computes in bf16."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _checkpoint_dir(path: str | None) -> bool:
    """Whether `path` is a model directory with weights (else the weights are a fresh init)."""
    return bool(path) and not path.endswith(".json") and has_weights(path)


def weight_source(model: nn.Module, seed: int, path: str | None = None) -> WeightSource:
    """Where `model`'s (the full meta model's) weights come from: the safetensors of a local model
    directory, else a fresh initialisation for `seed`."""
    if _checkpoint_dir(path):
        return HFCheckpoint(path, model)
    return SeededInit(model, seed)


def describe_weights(config: PretrainedConfig, seed: int, path: str | None = None) -> str:
    """Where the weights of a model of `config` come from, as `weight_source` decides, in words."""
    if _checkpoint_dir(path):
        checkpoint = HFCheckpoint(path, build_meta_model(config))
        return f"{path}, {len(checkpoint.keys_read())} of its {len(checkpoint.entries)} tensors read"
    return f"fresh init, seed {seed}"


def check_weights(path: str, config: PretrainedConfig) -> None:
    """Raises ValueError (one line) when the checkpoint in `path`, if any, cannot fill a model of
    `config`: unreadable files, missing tensors, wrong shapes or dtypes. Reads file headers only."""
    if _checkpoint_dir(path):
        HFCheckpoint(path, build_meta_model(config)).check()


def reference_model(config: PretrainedConfig, seed: int, path: str | None = None) -> nn.Module:
    """The single-process HF model every layout must reproduce (fp32, CPU): transformers' own
    `from_pretrained` for a local checkpoint, else the seed's fresh weights, built whole."""
    if _checkpoint_dir(path):
        multimodal = multimodal_config(path, config)
        if multimodal is None:
            return AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True,
                                                        dtype=torch.float32)
        # A multimodal checkpoint: the language model and head that the multimodal class's
        # from_pretrained loads, in the causal LM of its text config.
        loaded = AutoModelForMultimodalLM.from_pretrained(path, config=multimodal, local_files_only=True,
                                                          dtype=torch.float32)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(language_model_state(loaded, model))
        return model.eval()
    model = build_meta_model(config)
    materialize(model, SeededInit(model, seed), "cpu")
    return model
