"""Grouped GEMM over the experts of this rank, on the HF v5 expert layout
(`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I])."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from moe.routing import Routed


def _grouped_mm_works(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or x.shape[0] == 0:
        # An empty batch reaches the CPU kernel's backward with a zero-stride gradient it rejects.
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    # The CPU kernel needs 16-byte aligned row strides for both operands.
    return all(dim * x.element_size() % 16 == 0 for dim in weight.shape[1:])


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """`x` rows grouped by expert (`counts[e]` rows for expert e) times `weight[e]`^T."""
    if _grouped_mm_works(x, weight):
        offsets = torch.tensor(counts, device=x.device).cumsum(0, dtype=torch.int32)
        out = F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
        if out.requires_grad:
            # The CPU backward rejects expanded (zero-stride) gradients, as produced by sum().
            out.register_hook(torch.Tensor.contiguous)
        return out
    # Every expert takes part, even with no rows, so each local weight always gets a gradient.
    return torch.cat([chunk @ w.t() for chunk, w in zip(x.split(counts), weight.unbind(0))])


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def local_experts_forward(experts: nn.Module, routed: Routed) -> torch.Tensor:
    """Each received row through its local experts, weighted and summed: [rows, hidden]."""
    gate_up, down = _local(experts.gate_up_proj), _local(experts.down_proj)
    num_local = gate_up.shape[0]
    rows, expert = routed.routing_map.nonzero(as_tuple=True)
    expert, order = torch.sort(expert, stable=True)
    rows = rows[order]
    counts = torch.bincount(expert, minlength=num_local).tolist()
    hidden = experts._apply_gate(grouped_linear(routed.x[rows], gate_up, counts))
    out = grouped_linear(hidden, down, counts) * routed.weights[rows, expert].unsqueeze(-1)
    return out.new_zeros(routed.x.shape[0], out.shape[1]).index_add(0, rows, out)
