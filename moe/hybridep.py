"""NVIDIA HybridEP (DeepEP's hybrid-ep branch) as the `hybridep::dispatch` / `hybridep::combine`
ops: NVLink-domain aware dispatch and combine.

As for DeepEP (moe/deepep.py), the ops are what selective AC saves, and each one's backward is
the other along the dispatch's handle. HybridEP routes by a dense [tokens, experts] map and
probability matrix, built here from the top-k ids (its own top-k path cannot take -1 ids), so
the probability gradient reaches the top-k weights through that scatter. Its dispatched
probabilities hold every expert of the NVLink domain: this rank's are the columns from
`local_rank * local_experts`.

Two upstream behaviours the harness covers: the combine leaves the rows of tokens no rank
received unwritten (they are zeroed here, in the forward and in the dispatch's backward), and
every rank of the group must hand the kernels the same number of tokens (each rank pads its
tokens to the count the group agreed on when the buffer was built). `build` checks at start what
upstream asserts when the buffer is built (rules in moe/hybridep_support.py).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from moe.deep_ep_runtime import (check_bf16, define_combine, ensure_buffer, fake_handle_id, gather_facts,
                                 get_buffer, get_handle, load_deep_ep, release_handle, release_unless_backward,
                                 row_size_problem, store_handle)
from moe.hybridep_support import DOMAIN_SIZE_VARIABLE, group_problem, local_facts, multinode_build, setting_problem
from moe.routing import Routed, dense_routing, routed_ids

_BACKEND = "hybridep"


class _Layout(NamedTuple):
    """What a dispatch leaves for its combine and backward, behind the handle id."""
    handle: tuple  # upstream's
    num_experts: int
    rows: int  # rows this rank received
    unrouted: torch.Tensor  # [tokens, 1] bool: tokens no rank received, whose rows upstream leaves unwritten


def _local_columns(buffer: Any, num_local: int) -> slice:
    start = buffer.local_rank * num_local
    return slice(start, start + num_local)


@torch.library.custom_op(f"{_BACKEND}::dispatch", mutates_args=())
def dispatch(x: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor, num_local_experts: int,
             group_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token to the ranks of its experts, once per rank. Returns the received rows, their
    [rows, local experts] probabilities and routing map, and the id of the layout handle."""
    buffer = get_buffer(_BACKEND, group_name)
    recv_x, recv_probs, _, handle = buffer.dispatch(hidden=x, routing_map=routing_map, probs=probs)
    rows = recv_x.shape[0]
    # handle[4]: the local expert routing map, sized for the buffer's largest batch.
    local_map = handle[4][:rows].clone()
    local_probs = recv_probs[:, _local_columns(buffer, num_local_experts)].contiguous()
    layout = _Layout(handle, routing_map.shape[1], rows, ~routing_map.any(1, keepdim=True))
    return recv_x, local_probs, local_map, store_handle(layout)


@dispatch.register_fake
def _(x, routing_map, probs, num_local_experts, group_name):
    rows = torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty(rows, x.shape[1]), probs.new_empty(rows, num_local_experts),
            routing_map.new_empty(rows, num_local_experts), fake_handle_id())


def _setup_dispatch(ctx, inputs, output) -> None:
    ctx.num_local, ctx.group_name = inputs[3], inputs[4]
    ctx.handle_id = output[3]
    ctx.recv_x_shape, ctx.recv_probs_shape = output[0].shape, output[1].shape


def _dispatch_backward(ctx, grad_x, grad_probs, grad_map, grad_handle):
    buffer = get_buffer(_BACKEND, ctx.group_name)
    layout: _Layout = get_handle(ctx.handle_id)
    if grad_x is None:
        grad_x = torch.zeros(ctx.recv_x_shape, dtype=torch.bfloat16, device=grad_probs.device)
    if grad_probs is None:
        grad_probs = torch.zeros(ctx.recv_probs_shape, dtype=torch.float32, device=grad_x.device)
    # Back to the dispatched layout: every expert of the NVLink domain, this rank's columns set.
    domain_probs = grad_probs.new_zeros(layout.rows, ctx.num_local * buffer.num_of_hybrid_ep_ranks_per_nvlink_domain)
    domain_probs[:, _local_columns(buffer, ctx.num_local)] = grad_probs
    grad_in, grad_dense_probs = buffer.combine(grad_x.contiguous(), probs=domain_probs, handle=layout.handle)
    release_handle(ctx.handle_id)  # the dispatch's backward is the handle's last user
    return grad_in.masked_fill_(layout.unrouted, 0), None, grad_dense_probs.masked_fill_(layout.unrouted, 0), None, None


dispatch.register_autograd(_dispatch_backward, setup_context=_setup_dispatch)


def _combine(buffer: Any, y: torch.Tensor, layout: _Layout) -> torch.Tensor:
    combined, _ = buffer.combine(y, handle=layout.handle)
    return combined.masked_fill_(layout.unrouted, 0)


def _dispatch_cached(buffer: Any, grad: torch.Tensor, layout: _Layout) -> torch.Tensor:
    # Without a routing map upstream asks for the expert count; the known row count spares it
    # a stream synchronization to read the count back from the device.
    recv, *_ = buffer.dispatch(hidden=grad, handle=layout.handle, num_of_experts=layout.num_experts,
                               num_dispatched_tokens=layout.rows)
    return recv


define_combine(_BACKEND, _combine, _dispatch_cached)


class _BufferShape(NamedTuple):
    hidden_size: int
    local_experts: int
    tokens: int  # what every rank of the group dispatches


_BUFFER_SHAPES: dict[str, _BufferShape] = {}  # group name -> the shape of its buffer


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


class HybridEPDispatcher:
    name = _BACKEND

    def __init__(self, group: dist.ProcessGroup, buffer_cls: type) -> None:
        self.group = group
        self.group_name = group.group_name
        self.world = dist.get_world_size(group)
        self._buffer_cls = buffer_cls

    def _ensure_buffer(self, x: torch.Tensor, num_local: int) -> int:
        """Builds the group's buffer if needed; returns the token count every rank dispatches."""
        def create() -> Any:
            # HybridEP all-gathers every rank's routing map into a buffer sized by its own token
            # count, so all ranks must dispatch the same count: the largest, agreed here.
            tokens = torch.tensor([x.shape[0]], device=x.device)
            dist.all_reduce(tokens, op=dist.ReduceOp.MAX, group=self.group)
            _BUFFER_SHAPES[self.group_name] = _BufferShape(x.shape[1], num_local, int(tokens))
            return self._buffer_cls(self.group, hidden_dim=x.shape[1], max_num_of_tokens_per_rank=int(tokens),
                                    num_local_experts=num_local)

        # The hidden size and local experts are the same on every rank, so all rebuild together.
        shape = _BUFFER_SHAPES.get(self.group_name)
        ensure_buffer(_BACKEND, self.group, lambda _: shape is not None and shape[:2] == (x.shape[1], num_local), create)
        tokens = _BUFFER_SHAPES[self.group_name].tokens
        if x.shape[0] > tokens:
            # Growing would be a collective that only this rank knows it needs.
            raise ValueError(f"moe.dispatcher=hybridep: {x.shape[0]} tokens on this rank, more than the {tokens} every "
                             "rank of its EP group dispatches since the first forward (HybridEP needs one count on all "
                             "ranks); keep later batches at most the first one's size, or choose moe.dispatcher=alltoall")
        return tokens

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int) -> tuple[Routed, Any]:
        check_bf16(self.name, x)
        num_local = num_experts // self.world
        tokens = self._ensure_buffer(x, num_local)
        routing_map, probs = dense_routing(routed_ids(topk_ids.long(), num_experts), topk_weights.float(), num_experts)
        # The padding rows route nowhere.
        recv_x, recv_probs, local_map, handle_id = torch.ops.hybridep.dispatch(
            _pad_rows(x, tokens).contiguous(), _pad_rows(routing_map, tokens).contiguous(),
            _pad_rows(probs, tokens).contiguous(), num_local, self.group_name)
        # The kernels carry probabilities as fp32; the experts use them in the router's dtype.
        return Routed(recv_x, local_map, recv_probs.to(topk_weights.dtype)), (handle_id, x.shape[0], tokens)

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        handle_id, num_tokens, padded_tokens = handle
        combined = torch.ops.hybridep.combine(y, handle_id, padded_tokens, self.group_name)
        release_unless_backward(combined, handle_id)
        return combined[:num_tokens]


def buffer_class() -> type:
    """deep_ep's HybridEPBuffer; RuntimeError with the reason it cannot be had here."""
    buffer_cls = getattr(load_deep_ep(), "HybridEPBuffer", None)
    if buffer_cls is None:
        raise RuntimeError("deep_ep has no HybridEPBuffer (needs the hybrid-ep branch)")
    return buffer_cls


def _local_problem(hidden_size: int) -> str | None:
    """What rules HybridEP out on this rank alone, without a process group."""
    problem = row_size_problem(hidden_size)
    if problem is not None:
        return problem
    try:
        buffer_class()
    except RuntimeError as exc:
        return str(exc)
    return None


def preflight(ep: int, hidden_size: int) -> None:
    """RuntimeError with the reason HybridEP cannot run `ep` ranks here, as far as this process can
    tell before any process group exists (the NVLink domains only where the environment sets them)."""
    setting = os.environ.get(DOMAIN_SIZE_VARIABLE)
    problem = _local_problem(hidden_size)
    if problem is None and setting is not None:
        problem = setting_problem(ep, setting, {multinode_build()})
    if problem is not None:
        raise RuntimeError(problem)


def build(group: dist.ProcessGroup, hidden_size: int) -> HybridEPDispatcher:
    """Collective: every rank reports its facts, and all take the same decision on them."""
    problem = group_problem(gather_facts(group, local_facts(_local_problem(hidden_size))))
    if problem is not None:
        raise RuntimeError(problem)
    return HybridEPDispatcher(group, buffer_class())
