"""The default dispatcher: all_to_all over any backend (gloo included), as the harness.ep_*
custom ops of moe/ops.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe import ops  # noqa: F401  (registers torch.ops.harness.ep_dispatch / ep_combine)
from moe.routing import Routed, dense_routing, routed_ids


@dataclass
class _AllToAllHandle:
    token_index: torch.Tensor
    input_splits: list[int]
    output_splits: list[int]
    num_tokens: int


class AllToAllDispatcher:
    """Steps: mark which ranks each token must visit -> exchange per-rank counts -> send each
    (token, rank) pair once with its routing restricted to that rank's experts -> experts ->
    send outputs back -> sum them per token.
    """

    name = "alltoall"

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.group_name = group.group_name
        self.world = dist.get_world_size(group)

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int) -> tuple[Routed, _AllToAllHandle]:
        num_local = num_experts // self.world
        topk_ids = routed_ids(topk_ids, num_experts)
        # [tokens, k]: rank holding each routed expert; a spare column for ids routed nowhere.
        dest = torch.where(topk_ids >= 0, topk_ids // num_local, self.world)
        visits = torch.zeros(x.shape[0], self.world + 1, dtype=torch.bool, device=x.device)
        visits = visits.scatter_(1, dest, True)[:, :self.world]
        # One row per (token, destination rank), ordered by rank, then token.
        rank_of_row, token_index = visits.t().nonzero(as_tuple=True)
        send_counts = visits.sum(0)
        ones = [1] * self.world
        recv_counts = torch.ops.harness.ep_dispatch(send_counts.view(self.world, 1), ones, ones, self.group_name)
        input_splits, output_splits = send_counts.tolist(), recv_counts.view(-1).tolist()

        on_dest = dest[token_index] == rank_of_row.unsqueeze(1)
        local_ids = torch.where(on_dest, topk_ids[token_index] - (rank_of_row * num_local).unsqueeze(1), -1)
        weights = topk_weights[token_index].masked_fill(~on_dest, 0)

        def send(t: torch.Tensor) -> torch.Tensor:
            return torch.ops.harness.ep_dispatch(t, input_splits, output_splits, self.group_name)

        routing_map, dense_weights = dense_routing(send(local_ids), send(weights), num_local)
        routed = Routed(send(x[token_index]), routing_map, dense_weights)
        return routed, _AllToAllHandle(token_index, input_splits, output_splits, x.shape[0])

    def combine(self, y: torch.Tensor, handle: _AllToAllHandle) -> torch.Tensor:
        back = torch.ops.harness.ep_combine(y, handle.output_splits, handle.input_splits, self.group_name)
        return y.new_zeros(handle.num_tokens, y.shape[1]).index_add(0, handle.token_index, back)


def build(group: dist.ProcessGroup, hidden_size: int) -> AllToAllDispatcher:
    """Any hidden size: the collectives move rows of any width."""
    return AllToAllDispatcher(group)
