"""Memory per rank: what the sharded training state holds, and the process's peak."""

from __future__ import annotations

import resource

import torch
from torch.distributed.tensor import DTensor

MiB = 2**20


def _local_bytes(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def state_mib(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """This rank's shards of parameters, gradients and optimizer state, in MiB."""
    optimizer_bytes = sum(_local_bytes(v) for state in optimizer.state.values() for v in state.values()
                          if isinstance(v, torch.Tensor) and v.ndim > 0)
    return {"param_mib": sum(_local_bytes(p) for p in params) / MiB,
            "grad_mib": sum(_local_bytes(p.grad) for p in params) / MiB,
            "optimizer_mib": optimizer_bytes / MiB}


def peak_mib(device: torch.device) -> float:
    """Peak allocated device memory on GPU; on CPU the process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
