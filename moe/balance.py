"""Load balancing for MoE training.

Auxiliary loss: HF's own. With `config.output_router_logits = True` the model returns
`outputs.aux_loss` (unscaled, over the tokens this forward saw); `aux_loss_term` scales it.

Aux-loss-free (DeepSeek-V3): the router's `e_score_correction_bias` biases expert selection
only. Tokens per expert are counted in the experts' forward and, after each optimizer step,
summed over the ranks that routed distinct tokens; then bias += rate * sign(mean - count).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes
from transformers import PretrainedConfig


def aux_loss_term(outputs, config: PretrainedConfig, num_loss_terms: int) -> torch.Tensor:
    """`router_aux_loss_coef * outputs.aux_loss / num_loss_terms`, to add to each microbatch loss.

    `num_loss_terms`: how many microbatch losses are summed into one gradient (microbatches x
    data-parallel ranks), so the aux contribution is their mean, as the token loss is a mean.
    """
    if outputs.aux_loss is None:
        raise ValueError("model returned no aux_loss: set config.output_router_logits = True")
    return config.router_aux_loss_coef * outputs.aux_loss / num_loss_terms


def is_recomputing() -> bool:
    # Activation-checkpoint recompute runs the forward again from inside the backward pass;
    # counting there would count every token twice.
    return torch._C._current_graph_task_id() != -1


def record_load(experts: nn.Module, top_k_index: torch.Tensor) -> None:
    """Adds this forward's tokens per expert to `experts._expert_load` (training forwards only)."""
    if not torch.is_grad_enabled() or is_recomputing():
        return
    # Bookkeeping, hidden from an active selective-checkpoint mode: the recompute skips it,
    # and that mode matches forward and recompute ops by their order of appearance.
    with _disable_current_modes():
        counts = torch.bincount(top_k_index.flatten(), minlength=experts.num_experts)
        load = getattr(experts, "_expert_load", None)
        experts._expert_load = counts if load is None else load + counts


@torch.no_grad()
def update_expert_bias(experts_modules: list[nn.Module], rate: float, group: dist.ProcessGroup | None) -> None:
    """Aux-loss-free step: call once per optimizer step, on every rank of `group`.

    `group`: the ranks that each route different tokens through the same layers (data
    parallel x context parallel; not tensor-parallel or pipeline peers, which would count
    the same tokens twice or mix layers). The counts are reset afterwards.
    """
    biased = [m for m in experts_modules if m._expert_parallel.router is not None]
    if not biased:
        return
    loads = torch.stack([_take_load(m) for m in biased]).float()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(loads, group=group)
    for experts, load in zip(biased, loads):
        bias = experts._expert_parallel.router.e_score_correction_bias
        bias += rate * torch.sign(load.mean() - load).to(bias.dtype)


def _take_load(experts: nn.Module) -> torch.Tensor:
    bias = experts._expert_parallel.router.e_score_correction_bias
    load = getattr(experts, "_expert_load", None)
    experts._expert_load = None
    if load is None:  # no training forward since the last update (e.g. another pipeline stage's)
        return torch.zeros(experts.num_experts, dtype=torch.long, device=bias.device)
    return load.to(bias.device)
