"""Grouped GEMM over the experts of this rank, for every expert layout transformers'
`ExpertsInterface` describes on the experts module: `has_gate` (fused `gate_up_proj`, else
`up_proj` + `act_fn`), `is_transposed` ([E, in, out] instead of [E, out, in]), `has_bias`
(`<proj>_bias` [E, out]) and `has_post_expert_norm`. The gate itself is the family's own
`_apply_gate` (GPT-OSS: interleaved, clamped SwiGLU), so no family's math is repeated here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from moe.routing import Routed


def up_projection_name(experts: nn.Module) -> str:
    return "gate_up_proj" if experts.has_gate else "up_proj"


def expert_param_names(experts: nn.Module) -> tuple[str, ...]:
    """The experts' per-expert tensors ([E, ...]), which expert parallel shards over experts."""
    names = (up_projection_name(experts), "down_proj")
    return names + tuple(f"{name}_bias" for name in names) if experts.has_bias else names


def expert_input_size(experts: nn.Module) -> int:
    """The width of the rows the experts take: what a dispatcher moves."""
    up = getattr(experts, up_projection_name(experts))
    return up.shape[1] if experts.is_transposed else up.shape[2]


def _grouped_mm_works(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or x.shape[0] == 0:
        # An empty batch reaches the CPU kernel's backward with a zero-stride gradient it rejects.
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    # The CPU kernel needs 16-byte aligned row strides for both operands.
    return all(dim * x.element_size() % 16 == 0 for dim in weight.shape[1:])


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int], transposed: bool = False) -> torch.Tensor:
    """`x` rows grouped by expert (`counts[e]` rows for expert e) times `weight[e]`^T, or times
    `weight[e]` when `transposed` (weights stored [E, in, out])."""
    weight = weight if transposed else weight.transpose(-2, -1)
    if _grouped_mm_works(x, weight):
        offsets = torch.tensor(counts, device=x.device).cumsum(0, dtype=torch.int32)
        out = F.grouped_mm(x, weight, offs=offsets)
        if out.requires_grad:
            # The CPU backward rejects expanded (zero-stride) gradients, as produced by sum().
            out.register_hook(torch.Tensor.contiguous)
        return out
    # Every expert takes part, even with no rows, so each local weight always gets a gradient.
    return torch.cat([chunk @ w for chunk, w in zip(x.split(counts), weight.unbind(0))])


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _project(experts: nn.Module, name: str, x: torch.Tensor, expert: torch.Tensor, counts: list[int]) -> torch.Tensor:
    out = grouped_linear(x, _local(getattr(experts, name)), counts, experts.is_transposed)
    if experts.has_bias:
        # Out of place: a saved matmul output must not be mutated (selective AC caches it).
        out = out + _local(getattr(experts, f"{name}_bias"))[expert]
    return out


def local_experts_forward(experts: nn.Module, routed: Routed) -> torch.Tensor:
    """Each received row through its local experts, weighted and summed: [rows, hidden]."""
    up_name = up_projection_name(experts)
    num_local = _local(getattr(experts, up_name)).shape[0]
    rows, expert = routed.routing_map.nonzero(as_tuple=True)
    expert, order = torch.sort(expert, stable=True)
    rows = rows[order]
    counts = torch.bincount(expert, minlength=num_local).tolist()
    hidden = _project(experts, up_name, routed.x[rows], expert, counts)
    hidden = experts._apply_gate(hidden) if experts.has_gate else experts.act_fn(hidden)
    out = _project(experts, "down_proj", hidden, expert, counts)
    if experts.has_post_expert_norm:
        out = experts.post_expert_norm(out)
    out = out * routed.weights[rows, expert].unsqueeze(-1)
    return out.new_zeros(routed.x.shape[0], out.shape[1]).index_add(0, rows, out)
