"""DeepEP's normal (high-throughput) kernels as the `deepep::dispatch` / `deepep::combine` ops.

Being registered ops, they are what the selective-AC policy saves (moe.ops.SAC_SAVE_OPS), so a
recompute takes their outputs from the cache instead of communicating again. The backward of
dispatch is a combine along the dispatch's layout handle, and the backward of combine a cached
dispatch along it. Every kernel runs on DeepEP's communication stream after the compute
stream's work so far, and the compute stream waits for it before the outputs are used.

The ops register whenever this module imports; the kernels need `deep_ep` (deepseek-ai/DeepEP),
CUDA, and a group and GPUs they serve, which upstream asserts when the buffer is built at the
first forward: `build` checks all of it at start instead (rules in moe/deepep_support.py).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist

from moe.deep_ep_runtime import (check_bf16, define_combine, ensure_buffer, fake_handle_id, gather_facts,
                                 get_buffer, get_handle, load_deep_ep, release_handle, release_unless_backward,
                                 row_size_problem, store_handle)
from moe.deepep_support import group_problem, local_facts, pcie_problem
from moe.gpu_probe import gpu_name
from moe.routing import Routed, dense_routing, routed_ids

_BACKEND = "deepep"


def _wait(buffer: Any, kernel, *args, **kwargs) -> tuple:
    """Runs `kernel` on the communication stream after the compute stream's queued work; the
    compute stream then waits for it (the last returned value is upstream's EventOverlap)."""
    out = kernel(*args, **kwargs, previous_event=buffer.capture(), async_finish=True, allocate_on_comm_stream=True)
    out[-1].current_stream_wait()
    return out


@torch.library.custom_op(f"{_BACKEND}::dispatch", mutates_args=())
def dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
             group_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token to the ranks of its experts, once per rank. Returns the received rows, their
    top-k ids made local (-1: an expert of another rank), their weights (0 there) and the id
    of the layout handle."""
    buffer = get_buffer(_BACKEND, group_name)
    per_rank, per_rdma_rank, per_expert, in_rank, _ = _wait(buffer, buffer.get_dispatch_layout, topk_idx, num_experts)
    recv_x, recv_idx, recv_weights, _, handle, _ = _wait(
        buffer, buffer.dispatch, x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    return recv_x, recv_idx, recv_weights, store_handle(handle)


@dispatch.register_fake
def _(x, topk_idx, topk_weights, num_experts, group_name):
    rows = torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty(rows, x.shape[1]), topk_idx.new_empty(rows, topk_idx.shape[1]),
            topk_weights.new_empty(rows, topk_weights.shape[1]), fake_handle_id())


def _setup_dispatch(ctx, inputs, output) -> None:
    ctx.group_name = inputs[4]
    ctx.handle_id = output[3]
    ctx.recv_x_shape, ctx.recv_weights_shape = output[0].shape, output[2].shape


def _dispatch_backward(ctx, grad_x, grad_idx, grad_weights, grad_handle):
    buffer = get_buffer(_BACKEND, ctx.group_name)
    if grad_x is None:
        grad_x = torch.zeros(ctx.recv_x_shape, dtype=torch.bfloat16, device=grad_weights.device)
    if grad_weights is None:
        grad_weights = torch.zeros(ctx.recv_weights_shape, dtype=torch.float32, device=grad_x.device)
    grad_in, grad_topk_weights, _ = _wait(buffer, buffer.combine, grad_x.contiguous(), get_handle(ctx.handle_id),
                                          topk_weights=grad_weights.contiguous())
    release_handle(ctx.handle_id)  # the dispatch's backward is the handle's last user
    return grad_in, None, grad_topk_weights, None, None


dispatch.register_autograd(_dispatch_backward, setup_context=_setup_dispatch)


def _combine(buffer: Any, y: torch.Tensor, handle: Any) -> torch.Tensor:
    combined, _, _ = _wait(buffer, buffer.combine, y, handle)
    return combined


def _dispatch_cached(buffer: Any, grad: torch.Tensor, handle: Any) -> torch.Tensor:
    recv, *_ = _wait(buffer, buffer.dispatch, grad, handle=handle)
    return recv


define_combine(_BACKEND, _combine, _dispatch_cached)


def _buffer_size(buffer_cls: type, world: int, hidden_bytes: int) -> tuple[int, int]:
    """NVLink and RDMA bytes for rows of `hidden_bytes`, by upstream's own size hints."""
    configs = (buffer_cls.get_dispatch_config(world), buffer_cls.get_combine_config(world))
    return (max(c.get_nvl_buffer_size_hint(hidden_bytes, world) for c in configs),
            max(c.get_rdma_buffer_size_hint(hidden_bytes, world) for c in configs))


class DeepEPDispatcher:
    """A token goes once to each rank it visits; the expert side weights and sums."""

    name = _BACKEND

    def __init__(self, group: dist.ProcessGroup, buffer_cls: type, index_dtype: torch.dtype) -> None:
        self.group = group
        self.group_name = group.group_name
        self.world = dist.get_world_size(group)
        self._buffer_cls = buffer_cls
        self._index_dtype = index_dtype
        # Upstream's destructor can hang at exit: destroy explicitly where the build allows it.
        accepts = inspect.signature(buffer_cls).parameters
        self._buffer_kwargs = {"explicitly_destroy": True} if "explicitly_destroy" in accepts else {}

    def _ensure_buffer(self, x: torch.Tensor) -> None:
        nvl, rdma = _buffer_size(self._buffer_cls, self.world, x.shape[1] * x.element_size())
        ensure_buffer(_BACKEND, self.group, lambda b: b.num_nvl_bytes >= nvl and b.num_rdma_bytes >= rdma,
                      lambda: self._buffer_cls(self.group, nvl, rdma, **self._buffer_kwargs))

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int) -> tuple[Routed, Any]:
        check_bf16(self.name, x)
        self._ensure_buffer(x)
        recv_x, recv_ids, recv_weights, handle_id = torch.ops.deepep.dispatch(
            x.contiguous(), routed_ids(topk_ids, num_experts).to(self._index_dtype).contiguous(),
            topk_weights.float().contiguous(),
            num_experts, self.group_name)
        # The kernels carry weights as fp32; the experts use them in the router's dtype, as with alltoall.
        weights = recv_weights.to(topk_weights.dtype)
        routing_map, weights = dense_routing(recv_ids.long(), weights, num_experts // self.world)
        return Routed(recv_x, routing_map, weights), (handle_id, x.shape[0])

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        handle_id, num_tokens = handle
        combined = torch.ops.deepep.combine(y, handle_id, num_tokens, self.group_name)
        release_unless_backward(combined, handle_id)
        return combined


def _local_problem(world: int, hidden_size: int) -> str | None:
    """What rules DeepEP out on this rank alone, without a process group."""
    problem = row_size_problem(hidden_size)
    if problem is not None:
        return problem
    try:
        load_deep_ep().Buffer.get_dispatch_config(world)
    except RuntimeError as exc:
        return str(exc)
    except AssertionError as exc:  # upstream's table of the group sizes its kernels are tuned for
        return f"EP size {world} unsupported by DeepEP's kernels ({exc})"
    return None


def preflight(ep: int, hidden_size: int) -> None:
    """RuntimeError with the reason DeepEP cannot run `ep` ranks of this machine's GPUs, as far as
    this process can tell before any process group exists."""
    problem = _local_problem(ep, hidden_size) or pcie_problem(gpu_name(), ep)
    if problem is not None:
        raise RuntimeError(problem)


def build(group: dist.ProcessGroup, hidden_size: int) -> DeepEPDispatcher:
    """Collective: every rank reports its facts, and all take the same decision on them."""
    facts = gather_facts(group, local_facts(_local_problem(dist.get_world_size(group), hidden_size)))
    problem = group_problem(facts)
    if problem is not None:
        raise RuntimeError(problem)
    deep_ep = load_deep_ep()
    # `topk_idx_t`: the index dtype the build was compiled with (int64 unless configured otherwise).
    return DeepEPDispatcher(group, deep_ep.Buffer, getattr(deep_ep, "topk_idx_t", torch.int64))
