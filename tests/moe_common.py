"""Shared pieces of the MoE tests: the batch, an EP model (the one-process reference is tests/reference.py)."""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from transformers import AutoConfig

from harness.materialize import materialize
from harness.model_parts import decoder_layers, moe_blocks
from harness.models import build_meta_model, reference_model
from moe.balance import track_expert_load
from moe.expert_parallel import apply_expert_parallel
from moe.ops import SAC_SAVE_OPS
from parallel.activation_checkpointing import apply_selective_checkpointing_to_layers

SEED = 0


def gpt_oss_config():
    """A tiny GPT-OSS: transposed, biased experts with the clamped, interleaved SwiGLU (a small
    `swiglu_limit`, so the clamp is active), sliding and full attention layers."""
    config = AutoConfig.for_model("gpt_oss", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=16, num_hidden_layers=2, vocab_size=256, intermediate_size=32,
                                  num_local_experts=4, num_experts_per_tok=2, swiglu_limit=0.5,
                                  sliding_window=8, tie_word_embeddings=False)
    config.use_cache = False
    return config


def batch(vocab: int, rows: int = 4, seq: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab, (rows, seq + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def ep_blocks(model: nn.Module) -> list[tuple[nn.Module, nn.Module | None]]:
    """(experts, router) of every MoE block, as harness/parallelize.py hands them to EP."""
    return [(block.experts, block.router) for block in moe_blocks(model)]


def _recompute_everything(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.PREFER_RECOMPUTE


def ep_model(config, world: int, dispatcher: str = "alltoall", checkpointing: str | None = None,
             dtype: torch.dtype = torch.float32) -> tuple[nn.Module, list[nn.Module]]:
    """A model with experts over all `world` ranks; see `parallelize_ep`."""
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    model = build_meta_model(config)
    return model, parallelize_ep(model, mesh, dispatcher, checkpointing, dtype)


def parallelize_ep(model: nn.Module, mesh, dispatcher: str = "alltoall", checkpointing: str | None = None,
                   dtype: torch.dtype = torch.float32) -> list[nn.Module]:
    """The trainer's order on a meta model (or pipeline stage): EP over the 1-D `mesh` (and
    aux-loss-free load counting where a router has a correction bias) -> activation checkpointing -> materialize in `dtype`. Returns the experts modules.

    `checkpointing`: None, "selective" (the project's policy) or "recompute_all" (a control).
    """
    experts = apply_expert_parallel(ep_blocks(model), mesh, dispatcher)
    track_expert_load(ep_blocks(model))
    layers = decoder_layers(model)
    if checkpointing == "selective":
        apply_selective_checkpointing_to_layers(model, layers, has_kv_sharing=False, extra_save_ops=SAC_SAVE_OPS)
    elif checkpointing == "recompute_all":
        context_fn = partial(create_selective_checkpoint_contexts, _recompute_everything)
        for index, layer in enumerate(layers):
            layers[index] = checkpoint_wrapper(layer, context_fn=context_fn)
    if checkpointing:
        blocks = layers.values() if isinstance(layers, nn.ModuleDict) else layers
        assert all(isinstance(layer, CheckpointWrapper) for layer in blocks)
    materialize(model, reference_model(model.config, SEED), "cpu")
    model.to(dtype)
    return experts


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Expert grads gathered from their shards; dense grads summed over the ranks' slices."""
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        if isinstance(param.grad, DTensor):
            grads[name] = param.grad.full_tensor()
        else:
            grads[name] = param.grad.clone()
            dist.all_reduce(grads[name])
    return grads


def canonical(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")
