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


def dense_routing(local_ids: torch.Tensor, weights: torch.Tensor, num_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, k] local expert ids (-1: not on this rank) -> dense [rows, num_local] map and weights."""
    slots = torch.where(local_ids >= 0, local_ids, num_local)  # a spare column swallows the -1s
    rows = local_ids.shape[0]
    routing_map = torch.zeros(rows, num_local + 1, dtype=torch.bool, device=local_ids.device)
    routing_map.scatter_(1, slots, True)
    dense = weights.new_zeros(rows, num_local + 1).scatter(1, slots, weights)
    return routing_map[:, :num_local], dense[:, :num_local]
