"""Gradient-norm clipping over parameters sharded on different meshes and pipeline stages.

Dense parameters are DTensors on the fsdp mesh, experts on the (efsdp, ep) mesh, and each
pipeline stage holds different parameters, so one foreach norm cannot see them all: take the
norm per sharding layout, make each one global, and sum the squares across stages.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float,
                    pp_group: dist.ProcessGroup | None = None,
                    uncounted: Iterable[torch.nn.Parameter] = ()) -> torch.Tensor:
    """Clips in place when max_norm > 0 and returns the total L2 norm of all gradients.

    `uncounted`: parameters among `parameters` that are copies of one counted elsewhere (a tied
    embedding held by two pipeline stages): clipped with the rest, left out of the norm."""
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    skip = {id(p) for p in uncounted}
    by_layout: dict[object, list[torch.Tensor]] = defaultdict(list)
    for grad in (p.grad for p in parameters if p.grad is not None and id(p) not in skip):
        key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
        by_layout[key].append(grad)
    squared = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for group in by_layout.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squared += norm.float() ** 2
    if pp_group is not None:
        dist.all_reduce(squared, group=pp_group)
    total = squared.sqrt()
    if max_norm > 0 and grads:
        # A device-side scale (1 when under the limit, an exact multiply): no wait for the norm.
        # Per gradient: one foreach call cannot mix DTensors of different meshes with plain tensors.
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(scale)
    return total
