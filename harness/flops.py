"""Model FLOPs per token and the peak they are measured against, for an MFU estimate."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import PretrainedConfig

from harness.model_parts import expert_count, experts_per_token, layer_configs

# Dense bf16 tensor-core peaks, TFLOP/s per device.
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}
# A rough fp32 FMA rate of one modern x86 core (AVX2/AVX-512); an order of magnitude, no more.
_CPU_CORE_GFLOPS = 50.0


def flops_per_token(model: nn.Module, config: PretrainedConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active matmul parameters + causal attention scores and values.

    Embedding lookups cost nothing; experts count at top_k / num_experts of their size.
    """
    experts = expert_count(config)
    embedding = model.get_input_embeddings()
    skipped = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    active = 0.0
    for name, param in model.named_parameters():
        if id(param) in skipped or param.ndim < 2:
            continue
        share = experts_per_token(config) / experts if experts and ".experts." in name else 1.0
        active += param.numel() * share
    # QK^T and AV: 2 matmuls x 2 FLOPs x seq/2 keys on average (causal), x3 for forward + backward.
    attention = 3 * 2 * 2 * sum(map(_heads_dim, layer_configs(config))) * seq_len / 2
    return 6 * active + attention


def _heads_dim(config: PretrainedConfig) -> int:
    # Attention-free families (Mamba, RWKV) have no heads.
    heads = getattr(config, "num_attention_heads", 0) or 0
    return heads * (getattr(config, "head_dim", None) or config.hidden_size // max(heads, 1))


def peak_flops_per_rank(peak_tflops: float | None, local_world_size: int) -> float:
    """`peak_tflops` when given; else the GPU's known peak, or this rank's share of the CPU cores."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        raise ValueError(f"logging.peak_tflops: unknown peak for {name}; set it to the device's TFLOP/s")
    cores = (os.cpu_count() or 1) / local_world_size
    return cores * _CPU_CORE_GFLOPS * 1e9
