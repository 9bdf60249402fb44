"""Load balancing for MoE training.

Auxiliary loss: HF's own. With `config.output_router_logits = True` the model returns
`outputs.aux_loss` (unscaled, over the tokens this forward saw); `aux_loss_term` scales it.
HF's switch loss couples every layer of a forward (picks summed over all layers times
probabilities summed over all layers), so under pipeline parallel each stage adds its layers'
`router_statistics` to those it received and the last stage takes `switch_aux_loss` of the
total; the probabilities' gradient flows back through the stages with the activations. Under
tensor parallel each rank's routers see its slice of the sequence: the statistics are summed
over the tp ranks before the loss is taken (`summed_over_ranks`).

Aux-loss-free (DeepSeek-V3): the router's `e_score_correction_bias` biases expert selection
only. Tokens per expert are counted at the experts' input (any layout: one process, FSDP,
expert or pipeline parallel) and, after each optimizer step, summed over the ranks that routed
distinct tokens; then bias += rate * sign(mean - count).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.utils._python_dispatch import _disable_current_modes


def aux_loss_term(outputs, coefficient: float, num_loss_terms: int) -> torch.Tensor:
    """`coefficient * outputs.aux_loss / num_loss_terms`, to add to each microbatch loss.

    `num_loss_terms`: how many microbatch losses are summed into one gradient (microbatches x
    data-parallel ranks), so the aux contribution is their mean, as the token loss is a mean.
    """
    if outputs.aux_loss is None:
        raise ValueError("model returned no aux_loss: set config.output_router_logits = True")
    return coefficient * outputs.aux_loss / num_loss_terms


def router_statistics(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """[2, num_experts + 1] float32 sums over these layers' router rows: row 0 the routing
    probability per expert (differentiable), row 1 the top-k picks per expert then the rows."""
    stats = torch.zeros(2, num_experts + 1, dtype=torch.float32,
                        device=router_logits[0].device if router_logits else None)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        picks = torch.zeros(num_experts, dtype=torch.float32, device=probs.device)
        picks.scatter_add_(0, torch.topk(probs, top_k, dim=-1).indices.flatten(),
                           torch.ones(probs.shape[0] * top_k, device=probs.device))
        rows = torch.tensor([float(probs.shape[0])], device=probs.device)
        stats = stats + torch.stack([torch.cat([probs.sum(dim=0), rows.new_zeros(1)]),
                                     torch.cat([picks, rows])])
    return stats


def summed_over_ranks(stats: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """`stats` summed over the ranks of `mesh` (tensor parallel: each rank's routers saw its slice
    of the sequence). Every rank takes the same loss of the sum, so the gradient of a rank's own
    statistics is the sum's: no collective in backward."""
    as_partial = DTensor.from_local(stats, mesh, (Partial(),), run_check=False)
    return as_partial.redistribute(placements=(Replicate(),)).to_local()


def switch_aux_loss(stats: torch.Tensor, num_experts: int) -> torch.Tensor:
    """HF's `load_balancing_loss_func` (no attention mask) from summed `router_statistics`:
    num_experts * sum_e (picks_e / rows) * (probability_e / rows)."""
    probs, picks, rows = stats[0, :-1], stats[1, :-1].detach(), stats[1, -1].detach()
    return num_experts * torch.sum(picks / rows * probs / rows)


def splits_over_stages(family_loss: Callable, num_experts: int, top_k: int) -> bool:
    """Whether a family's own aux loss function equals `switch_aux_loss` of statistics summed
    over groups of layers (checked on random logits, so a family with its own variant is refused
    under pipeline parallel rather than trained on another loss)."""
    generator = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(7, num_experts, generator=generator) for _ in range(3))
    try:
        expected = torch.as_tensor(family_loss(logits, num_experts, top_k, None), dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        return False
    split = router_statistics(logits[:1], num_experts, top_k) + router_statistics(logits[1:], num_experts, top_k)
    return bool(torch.allclose(expected, switch_aux_loss(split, num_experts), rtol=1e-5, atol=1e-7))


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


@dataclass(frozen=True)
class CorrectionBias:
    """The router whose `e_score_correction_bias` an experts module's counts update (a plain
    holder: the router must not become a sub-module of the experts)."""
    router: nn.Module


def _count_routed(experts: nn.Module, args: tuple) -> None:
    record_load(experts, args[1])  # every v5 experts forward takes (hidden_states, top_k_index, top_k_weights)


def track_expert_load(blocks: list[tuple[nn.Module, nn.Module | None]]) -> int:
    """Count tokens per expert, for aux-loss-free balancing, in every (experts, router) block whose
    router has an `e_score_correction_bias`; returns how many blocks are tracked."""
    tracked = 0
    for experts, router in blocks:
        if getattr(router, "e_score_correction_bias", None) is None:
            continue
        experts._correction_bias = CorrectionBias(router)
        experts.register_forward_pre_hook(_count_routed)
        tracked += 1
    return tracked


def _tracked(modules: list[nn.Module]) -> list[nn.Module]:
    return [m for module in modules for m in module.modules() if hasattr(m, "_correction_bias")]


@torch.no_grad()
def update_expert_bias(modules: list[nn.Module], rate: float, group: dist.ProcessGroup | None) -> None:
    """Aux-loss-free step: call once per optimizer step, on every rank of `group`, with this rank's
    model parts (`track_expert_load` ran on them).

    `group`: the ranks that each route different tokens through the same layers (data
    parallel x context parallel x tensor parallel, whose ranks route their slices of the
    sequence; not pipeline peers, which would mix layers). The counts are reset afterwards.
    """
    biased = _tracked(modules)
    if not biased:
        return
    loads = torch.stack([_take_load(m) for m in biased]).float()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(loads, group=group)
    for experts, load in zip(biased, loads):
        bias = experts._correction_bias.router.e_score_correction_bias
        bias += rate * torch.sign(load.mean() - load).to(bias.dtype)


def _take_load(experts: nn.Module) -> torch.Tensor:
    bias = experts._correction_bias.router.e_score_correction_bias
    load = getattr(experts, "_expert_load", None)
    experts._expert_load = None
    if load is None:  # no training forward since the last update
        return torch.zeros(experts.num_experts, dtype=torch.long, device=bias.device)
    return load.to(bias.device)
