"""Tokens routed to each expert, for the metrics: counted from what every MoE block's experts
receive (`top_k_index`), summed over layers, ranks and the microbatches of a step."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from moe.balance import is_recomputing


def takes_routing(experts: nn.Module) -> bool:
    """Whether an experts module is called with the routing (`forward(hidden_states, top_k_index,
    top_k_weights)`, transformers' experts interface); Llama 4's takes pre-weighted copies of the
    tokens only, so there is nothing to count at its input."""
    return len(inspect.signature(experts.forward).parameters) >= 2


class ExpertLoadMeter:
    """Counts at the input of this rank's `experts` that `takes_routing` (none, on a pipeline
    stage without MoE layers: every rank still reports a vector of `num_experts`)."""

    def __init__(self, experts: list[nn.Module], num_experts: int) -> None:
        self.num_experts = num_experts
        self.counts: torch.Tensor | None = None  # on the routing's device: counting never waits for it
        for module in experts:
            if takes_routing(module):
                module.register_forward_pre_hook(self._count)

    def _count(self, experts: nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled() or is_recomputing():
            return
        # Bookkeeping, hidden from an active selective-checkpoint mode, which matches forward and
        # recompute ops by their order of appearance.
        with _disable_current_modes(), torch.no_grad():
            # Ids past the routed experts (LongCat-Flash's zero-computation experts) are not counted.
            counts = torch.bincount(args[1].flatten(), minlength=self.num_experts)[:self.num_experts]
            self.counts = counts if self.counts is None else self.counts + counts

    def take_counts(self) -> torch.Tensor:
        """This rank's routing decisions per expert since the last call (tokens x top-k x its MoE
        layers), still on the device; the caller sums them over the world (`expert_load_row`)."""
        counts = self.counts if self.counts is not None else torch.zeros(self.num_experts, dtype=torch.long)
        self.counts = None
        return counts.float()


def expert_load_row(counts: list[float]) -> dict[str, list[float] | float | int]:
    """Metrics of one step's world-summed counts: routing decisions counted, each expert's share of
    them, and the max/mean load."""
    routed = sum(counts)
    mean = routed / len(counts)
    return {"expert_routed": int(routed), "expert_load": [round(x / max(routed, 1), 5) for x in counts],
            "expert_load_max_over_mean": max(counts) / max(mean, 1e-9)}
