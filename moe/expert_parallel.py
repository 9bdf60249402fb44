"""Expert parallelism for Hugging Face MoE blocks.

The experts' weights become DTensors sharded Shard(0) over the EP mesh (each rank holds
num_experts / ep whole experts; under tensor parallel, replicated over tp: each tp rank
dispatches its own tokens within its ep group), and the experts' forward is swapped through
transformers' `ExpertsInterface`, so HF's own router, shared experts and router-logit outputs (aux loss)
run unchanged around it. Runs on the meta-device model, before activation checkpointing,
FSDP and materialization.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moe.dispatch import resolve_dispatcher
from moe.experts import expert_input_size, expert_param_names, local_experts_forward
from moe.routing import Dispatcher

logger = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "harness_ep"


@dataclass
class ExpertParallelState:
    dispatcher: Dispatcher
    dispatcher_reason: str  # e.g. "deepep: not installed (...) -> alltoall", for the start-up summary


def _ep_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    state: ExpertParallelState = self._expert_parallel
    routed, handle = state.dispatcher.dispatch(hidden_states, top_k_index, top_k_weights, self.num_experts)
    expert_out = local_experts_forward(self, routed).to(hidden_states.dtype)
    return state.dispatcher.combine(expert_out, handle)


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, _ep_experts_forward)


def check_expert_parallel_support(experts: nn.Module, ep: int) -> None:
    """ValueError (one line: the class and what is missing) if `experts` cannot be split over `ep` ranks."""
    name = type(experts).__name__
    if not hasattr(experts, "has_gate"):
        raise ValueError(f"{name}: not an ExpertsInterface experts class (no @use_experts_implementation)")
    missing = [p for p in expert_param_names(experts) if not isinstance(getattr(experts, p, None), torch.Tensor)]
    if missing:
        raise ValueError(f"{name}: expert parallel needs the experts' fused tensors; missing {', '.join(missing)}")
    if experts.num_experts % ep:
        raise ValueError(f"{name}: num_experts={experts.num_experts} is not divisible by ep={ep}; "
                         "choose an ep size that divides the number of experts")


def apply_expert_parallel(blocks: list[tuple[nn.Module, nn.Module | None]], ep_mesh: DeviceMesh,
                          dispatcher: str = "alltoall", strict: bool = False) -> list[nn.Module]:
    """Shard the experts of every MoE block over `ep_mesh` and route tokens with `dispatcher`.

    `blocks`: (experts module, router module or None) per MoE block, as the caller's model
    adapter finds them; none is fine (a pipeline stage of dense layers only). Only the experts
    change: routers stay replicated and run HF's own code. `ep_mesh`: the ep mesh, or under
    tensor parallel the (ep, tp) mesh, whose tp dimension the experts are replicated over
    (tensor parallel placed them replicated over tp before). Returns the experts modules, for
    the caller to FSDP-shard over the experts' FSDP mesh.
    """
    if ep_mesh.ndim not in (1, 2):
        raise ValueError(f"ep_mesh must be 1-D (ep) or 2-D (ep, tp), got a {ep_mesh.ndim}-D mesh")
    if not blocks:
        return []
    ep = ep_mesh.size(0)
    for experts, _ in blocks:
        check_expert_parallel_support(experts, ep)
    chosen, reason = resolve_dispatcher(dispatcher, strict, ep_mesh.get_group(0), expert_input_size(blocks[0][0]))
    placements = (Shard(0), *[Replicate()] * (ep_mesh.ndim - 1))
    for experts, _ in blocks:
        for name in expert_param_names(experts):
            param = getattr(experts, name)
            whole = param.data
            if isinstance(whole, DTensor):
                assert all(p.is_replicate() for p in whole.placements), f"{name}: tensor parallel left it split"
                whole = whole.to_local()
            sharded = distribute_tensor(whole, ep_mesh, placements)
            experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        # A private config copy: the switch must not leak into other modules or models that
        # share the config object, nor into an exported config.json.
        experts.config = copy.copy(experts.config)
        experts.config._experts_implementation = EXPERTS_IMPLEMENTATION
        experts._expert_parallel = ExpertParallelState(chosen, reason)
    experts0 = blocks[0][0]
    logger.debug("expert parallel: ep=%d, %d experts per rank in %d MoE blocks, dispatcher %s",
                ep, experts0.num_experts // ep, len(blocks), reason)
    return [experts for experts, _ in blocks]
