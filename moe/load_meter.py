"""Tokens routed to each expert, for the metrics: counted from what every MoE block's experts
receive (`top_k_index`), summed over layers, ranks and the microbatches of a step."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from moe.balance import is_recomputing


class ExpertLoadMeter:
    def __init__(self, experts: list[nn.Module]) -> None:
        self.experts = experts
        self.counts = torch.zeros(self.experts[0].num_experts if self.experts else 0)
        for experts in self.experts:
            experts.register_forward_pre_hook(self._count)

    def _count(self, experts: nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled() or is_recomputing():
            return
        # Bookkeeping, hidden from an active selective-checkpoint mode, which matches forward and
        # recompute ops by their order of appearance.
        with _disable_current_modes(), torch.no_grad():
            top_k_index = args[1]
            self.counts += torch.bincount(top_k_index.flatten().cpu(), minlength=len(self.counts)).float()

    def take(self) -> dict[str, list[float] | float]:
        """Every rank calls it after a step: routing decisions counted (tokens x top-k x MoE layers),
        each expert's share of them, and the max/mean load."""
        counts = self.counts.to("cuda" if dist.get_backend() == "nccl" else "cpu", copy=True)
        # Pipeline stages hold different layers and data-parallel ranks different tokens: a world
        # sum counts every routing decision of the step exactly once.
        dist.all_reduce(counts)
        self.counts.zero_()
        share = counts / counts.sum().clamp(min=1)
        return {"expert_routed": int(counts.sum().item()), "expert_load": [round(x, 5) for x in share.tolist()],
                "expert_load_max_over_mean": (counts.max() / counts.mean().clamp(min=1e-9)).item()}
