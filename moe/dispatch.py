"""Token dispatchers for expert parallelism: alltoall (default), deepep, hybridep.

A dispatcher moves each token to the EP ranks that hold its routed experts and brings the
expert outputs back. Every backend sends a token once per destination rank, not once per
routed expert, and the expert side weights and sums its local experts' outputs, so the
combine is a plain sum. What reaches the experts is a `Routed` batch: received rows plus a
dense [rows, local experts] routing map and routing weights.

DeepEP and HybridEP (moe/deepep.py) are optional: imported only when asked for; any failure
(not installed, no CUDA, an EP size their kernels do not support) falls back to alltoall
with one logged line, or raises when strict.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from moe import ops  # noqa: F401  (registers torch.ops.harness.ep_dispatch / ep_combine)

logger = logging.getLogger(__name__)

DISPATCHERS = ("alltoall", "deepep", "hybridep")
# DeepEP's intranode kernels are built for these NVLink group sizes.
_DEEPEP_EP_SIZES = (2, 4, 8)


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


@dataclass
class _AllToAllHandle:
    token_index: torch.Tensor
    input_splits: list[int]
    output_splits: list[int]
    num_tokens: int


class AllToAllDispatcher:
    """all_to_all over any backend (gloo included), as the harness.ep_* custom ops.

    Steps: mark which ranks each token must visit -> exchange per-rank counts -> send each
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
        dest = topk_ids // num_local  # [tokens, k]: rank holding each routed expert
        visits = torch.zeros(x.shape[0], self.world, dtype=torch.bool, device=x.device)
        visits.scatter_(1, dest, True)
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


def _load_backend(name: str, group: dist.ProcessGroup) -> Dispatcher:
    """Imports the optional backend; raises with the reason it cannot run here."""
    try:
        import deep_ep
    except Exception as exc:  # deep_ep can fail with more than ImportError (CUDA/NVSHMEM init)
        raise RuntimeError(f"not installed ({type(exc).__name__}: {exc})") from exc
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    from moe.deepep import DeepEPDispatcher, HybridEPDispatcher

    world = dist.get_world_size(group)
    if name == "deepep":
        if world not in _DEEPEP_EP_SIZES:
            raise RuntimeError(f"EP size {world} unsupported (intranode kernels: {_DEEPEP_EP_SIZES})")
        return DeepEPDispatcher(group, deep_ep.Buffer)
    buffer_cls = getattr(deep_ep, "HybridEPBuffer", None)
    if buffer_cls is None:
        raise RuntimeError("deep_ep has no HybridEPBuffer (needs the hybrid-ep branch)")
    return HybridEPDispatcher(group, buffer_cls)


_REPORTED: set[str] = set()


def resolve_dispatcher(name: str, strict: bool, ep_group: dist.ProcessGroup) -> tuple[Dispatcher, str]:
    """The dispatcher to run and a one-line reason for the start-up summary.

    An unavailable optional backend falls back to alltoall with one logged line, or raises
    RuntimeError when `strict`.
    """
    if name not in DISPATCHERS:
        raise ValueError(f"moe dispatcher {name!r} unknown: choose one of {', '.join(DISPATCHERS)}")
    if name == "alltoall":
        return AllToAllDispatcher(ep_group), "alltoall"
    try:
        return _load_backend(name, ep_group), name
    except RuntimeError as exc:
        reason = f"{name}: {exc} -> alltoall"
        if strict:
            raise RuntimeError(f"{name} dispatcher requested with strict=True but unavailable: {exc}") from exc
        if reason not in _REPORTED:  # once per process, however many stages or models resolve it
            _REPORTED.add(reason)
            logger.warning(reason)
        return AllToAllDispatcher(ep_group), reason
