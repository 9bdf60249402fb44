"""DeepEP dispatcher (optional; built by `moe.dispatch.build_dispatcher`).

It sends a token once per destination rank and keep the layout handle of the forward
dispatch: the backward of dispatch is a combine with that handle, and vice versa.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import _disable_current_modes

from moe.routing import Routed, dense_routing


class _DeepEPDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, x, topk_ids, topk_weights, num_experts):
        num_per_rank, num_per_rdma_rank, num_per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_ids, num_experts)
        recv_x, recv_ids, recv_weights, _, handle, _ = buffer.dispatch(
            x, topk_idx=topk_ids, topk_weights=topk_weights, num_tokens_per_rank=num_per_rank,
            num_tokens_per_rdma_rank=num_per_rdma_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=num_per_expert)
        ctx.buffer, ctx.handle = buffer, handle
        ctx.mark_non_differentiable(recv_ids)
        return recv_x, recv_ids, recv_weights, handle

    @staticmethod
    def backward(ctx, grad_x, grad_ids, grad_weights, grad_handle):
        # The dispatch handle replays the same layout in reverse: no new layout exchange.
        grad_in, grad_topk_weights, _ = ctx.buffer.combine(grad_x.contiguous(), ctx.handle,
                                                           topk_weights=grad_weights.contiguous())
        return None, grad_in, None, grad_topk_weights, None


class _DeepEPCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, y, handle):
        combined, _, _ = buffer.combine(y, handle)
        ctx.buffer, ctx.handle = buffer, handle
        return combined

    @staticmethod
    def backward(ctx, grad):
        grad_y, *_ = ctx.buffer.dispatch(grad.contiguous(), handle=ctx.handle)
        return None, grad_y, None


class DeepEPDispatcher:
    """DeepEP normal (high-throughput) kernels: a token goes once to each rank it visits."""

    name = "deepep"

    def __init__(self, group: dist.ProcessGroup, buffer_cls: type) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self._buffer_cls = buffer_cls
        self._buffer = None
        self._hidden_bytes = 0

    def _buffer_for(self, x: torch.Tensor):
        hidden_bytes = x.shape[1] * max(x.element_size(), 2)
        if self._buffer is None or hidden_bytes > self._hidden_bytes:
            # Allocation and IPC handle exchange must not be recorded by an active
            # selective-checkpoint mode, or recompute would try to replay them.
            with _disable_current_modes():
                nvl = rdma = 0
                for config in (self._buffer_cls.get_dispatch_config(self.world),
                               self._buffer_cls.get_combine_config(self.world)):
                    nvl = max(nvl, config.get_nvl_buffer_size_hint(hidden_bytes, self.world))
                    rdma = max(rdma, config.get_rdma_buffer_size_hint(hidden_bytes, self.world))
                self._buffer = self._buffer_cls(self.group, nvl, rdma)
            self._hidden_bytes = hidden_bytes
        return self._buffer

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int) -> tuple[Routed, Any]:
        buffer = self._buffer_for(x)
        recv_x, recv_ids, recv_weights, handle = _DeepEPDispatch.apply(
            buffer, x, topk_ids.long(), topk_weights.float(), num_experts)
        routing_map, weights = dense_routing(recv_ids, recv_weights, num_experts // self.world)
        return Routed(recv_x, routing_map, weights), handle

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        return _DeepEPCombine.apply(self._buffer, y, handle)


# DeepEP's intranode kernels are built for these NVLink group sizes.
_DEEPEP_EP_SIZES = (2, 4, 8)


def load_deep_ep() -> Any:
    """The deep_ep module; RuntimeError with the reason it cannot run here."""
    try:
        import deep_ep
    except Exception as exc:  # deep_ep can fail with more than ImportError (CUDA/NVSHMEM init)
        raise RuntimeError(f"not installed ({type(exc).__name__}: {exc})") from exc
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    return deep_ep


def build(group: dist.ProcessGroup) -> DeepEPDispatcher:
    deep_ep = load_deep_ep()
    world = dist.get_world_size(group)
    if world not in _DEEPEP_EP_SIZES:
        raise RuntimeError(f"EP size {world} unsupported (intranode kernels: {_DEEPEP_EP_SIZES})")
    return DeepEPDispatcher(group, deep_ep.Buffer)
