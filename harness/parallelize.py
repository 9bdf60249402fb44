"""The fixed order in which a model (or one pipeline stage of it) is parallelized:
context-parallel attention -> tensor parallel -> expert parallel -> activation checkpointing -> compile -> FSDP2 -> weights.

Runs on the meta-device model, so no rank ever holds more than its shards of the weights
(plus one module's worth while filling them).
"""

from __future__ import annotations

import torch
from torch import nn

from harness.config import Config
from harness.materialize import WeightSource, materialize
from harness.plan import Plan
from harness.model_parts import decoder_layers, expert_count, moe_blocks, tensor_parallel_parts
from parallel.ac_budget import apply_budget_plan
from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.compile import compile_layers, compile_unavailable_reason
from parallel.context_parallel import SequenceShard
from parallel.cp_attention import use_context_parallel_attention
from parallel.cp_ring_attention import SAC_SAVE_OPS as cp_save_ops
from parallel.fsdp import apply_fsdp, give_every_parameter_a_gradient
from parallel.mesh import ParallelMeshes
from parallel.tensor_parallel import apply_tensor_parallel


def parallelize(module: nn.Module, *, cfg: Config, plan: Plan, meshes: ParallelMeshes,
                weights: WeightSource, device: torch.device, sequence_shard: SequenceShard | None = None) -> None:
    layers = decoder_layers(module)
    if sequence_shard is not None:
        use_context_parallel_attention(module, sequence_shard)
    expert_parallel = plan.dims.ep > 1 and bool(expert_count(module.config))
    if plan.dims.tp > 1:
        apply_tensor_parallel(tensor_parallel_parts(module, expert_parallel), meshes.tp)
    expert_modules: list[nn.Module] = []
    moe_save_ops: tuple = ()
    if expert_parallel:
        from moe.expert_parallel import apply_expert_parallel
        from moe.ops import SAC_SAVE_OPS as moe_save_ops

        blocks = [(block.experts, block.router) for block in moe_blocks(module)]
        expert_modules = apply_expert_parallel(blocks, meshes.ep_tp if plan.dims.tp > 1 else meshes.ep,
                                               dispatcher=cfg.moe.dispatcher,
                                               strict=cfg.moe.dispatcher_strict)
    if cfg.moe.bias_update_rate > 0:
        from moe.balance import track_expert_load

        track_expert_load([(block.experts, block.router) for block in moe_blocks(module)])
    # Like TorchTitan's DeepSeek-V3 parallelize: the MoE package names its own communication
    # ops, which selective AC saves on top of torch's.
    # Context parallel's ring attention likewise.
    save_ops = (*moe_save_ops, *(cp_save_ops if sequence_shard is not None else ()))
    compile_blocks = cfg.train.compile and compile_unavailable_reason(device.type) is None
    if plan.ac_budget is not None:
        apply_budget_plan(module, layers, plan.ac_budget.layer_modes, extra_save_ops=save_ops)
    else:
        apply_activation_checkpointing(module, layers, plan.ac_mode, extra_save_ops=save_ops,
                                       enable_compile=compile_blocks)
    if compile_blocks:
        compile_layers(module, layers)
    block_list = list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)
    # One data-parallel rank has nothing to shard or reduce; on CPU FSDP would only add DTensor
    # overhead, but on CUDA it is what runs the layers in bf16 (its mixed-precision policy).
    if meshes.fsdp.size() > 1 or device.type == "cuda":
        # Experts behind transformers' ExpertsInterface run grouped GEMMs over all experts, and
        # expert parallel's forward runs every local expert; a family's own loop may skip some.
        if not expert_modules:
            give_every_parameter_a_gradient(block.experts for block in moe_blocks(module)
                                            if not hasattr(block.experts, "has_gate"))
        apply_fsdp(module, block_list, meshes.fsdp, reshard_after_forward=plan.reshard_after_forward,
                   expert_modules=expert_modules, expert_mesh=meshes.efsdp)
    materialize(module, weights, device)
