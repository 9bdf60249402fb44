"""HybridEP dispatcher (optional; DeepEP's hybrid-ep branch; built by `moe.dispatch.build_dispatcher`).

It sends a token once per destination rank and keeps the layout handle of the forward
dispatch: the backward of dispatch is a combine with that handle, and vice versa.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import _disable_current_modes

from moe.deepep import load_deep_ep
from moe.routing import Routed


class _HybridEPDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, x, topk_ids, topk_weights, num_experts):
        recv_x, recv_probs, _, handle = buffer.dispatch(x, topk_idx=topk_ids, topk_weights=topk_weights,
                                                        num_of_experts=num_experts)
        ctx.buffer, ctx.handle = buffer, handle
        return recv_x, recv_probs, handle

    @staticmethod
    def backward(ctx, grad_x, grad_probs, grad_handle):
        grad_in, grad_dense_probs = ctx.buffer.combine(grad_x.contiguous(), probs=grad_probs.contiguous(),
                                                       handle=ctx.handle)
        return None, grad_in, None, grad_dense_probs, None


class _HybridEPCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, y, handle):
        combined, _ = buffer.combine(y, handle=handle)
        ctx.buffer, ctx.handle = buffer, handle
        return combined

    @staticmethod
    def backward(ctx, grad):
        grad_y, *_ = ctx.buffer.dispatch(grad.contiguous(), handle=ctx.handle)
        return None, grad_y, None


class HybridEPDispatcher:
    """NVIDIA HybridEP (DeepEP hybrid-ep branch): NVLink-domain aware dispatch/combine."""

    name = "hybridep"

    def __init__(self, group: dist.ProcessGroup, buffer_cls: type) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self._buffer_cls = buffer_cls
        self._buffer = None

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int) -> tuple[Routed, Any]:
        num_local = num_experts // self.world
        if self._buffer is None:
            with _disable_current_modes():  # same reason as DeepEP: keep set-up out of SAC
                self._buffer = self._buffer_cls(self.group, hidden_dim=x.shape[1],
                                                max_num_of_tokens_per_rank=x.shape[0],
                                                num_local_experts=num_local)
        # HybridEP returns its routing as a dense probability matrix over tokens x experts.
        recv_x, recv_probs, handle = _HybridEPDispatch.apply(self._buffer, x, topk_ids.long(),
                                                             topk_weights.float(), num_experts)
        routing_map = handle[4][: recv_x.shape[0]]  # local_expert_routing_map: [tokens, local experts]
        return Routed(recv_x, routing_map, recv_probs.view(recv_x.shape[0], num_local)), handle

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        return _HybridEPCombine.apply(self._buffer, y, handle)


def build(group: dist.ProcessGroup) -> HybridEPDispatcher:
    buffer_cls = getattr(load_deep_ep(), "HybridEPBuffer", None)
    if buffer_cls is None:
        raise RuntimeError("deep_ep has no HybridEPBuffer (needs the hybrid-ep branch)")
    return HybridEPDispatcher(group, buffer_cls)
