"""The routing contract every token dispatcher and the experts share.

A dispatcher moves each token to the EP ranks that hold its routed experts and brings the
expert outputs back. Every backend sends a token once per destination rank, not once per
routed expert, and the expert side weights and sums its local experts' outputs, so the
combine is a plain sum. What reaches the experts is a `Routed` batch: received rows plus a
dense [rows, local experts] routing map and routing weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class Routed:
    """Rows that reached this rank's experts: `routing_map[r, e]` says row r goes to local
    expert e, with weight `weights[r, e]` (zero where the map is False)."""
    x: torch.Tensor
    routing_map: torch.Tensor
    weights: torch.Tensor


class Dispatcher(Protocol):
    name: str

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int) -> tuple[Routed, Any]: ...

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor: ...


def routed_ids(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`topk_ids` with -1 for ids past the experts, which transformers' expert loops skip (a hash
    router's padding id, LongCat-Flash's zero-computation experts)."""
    return torch.where((topk_ids >= 0) & (topk_ids < num_experts), topk_ids, -1)


def dense_routing(local_ids: torch.Tensor, weights: torch.Tensor, num_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, k] local expert ids (-1: not on this rank) -> dense [rows, num_local] map and weights.
    An expert picked twice for one row (a hash router's table may repeat one) gets both weights,
    as transformers' loop, which runs it once per pick, does."""
    slots = torch.where(local_ids >= 0, local_ids, num_local)  # a spare column swallows the -1s
    rows = local_ids.shape[0]
    routing_map = torch.zeros(rows, num_local + 1, dtype=torch.bool, device=local_ids.device)
    routing_map.scatter_(1, slots, True)
    dense = weights.new_zeros(rows, num_local + 1).scatter_add(1, slots, weights)
    return routing_map[:, :num_local], dense[:, :num_local]
