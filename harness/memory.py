"""Memory per rank: what the sharded training state holds, and the process's peak."""

from __future__ import annotations

import os
import resource

import torch
from torch.distributed.tensor import DTensor

MiB = 2**20


def local_bytes(tensor: torch.Tensor | None) -> int:
    """Bytes this rank holds of `tensor`: its local shard for a DTensor, 0 for None."""
    if tensor is None:
        return 0
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def state_bytes(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's shards of parameters, gradients and optimizer state (scalars such as Adam's step left out)."""
    return {"param": sum(local_bytes(p) for p in params),
            "grad": sum(local_bytes(p.grad) for p in params),
            "optimizer": sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                             if isinstance(v, torch.Tensor) and v.ndim > 0)}


def state_mib(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`state_bytes` in MiB, named as the metrics rows name them (param_mib, grad_mib, optimizer_mib)."""
    return {f"{key}_mib": count / MiB for key, count in state_bytes(params, optimizer).items()}


def peak_mib(device: torch.device) -> float:
    """Peak allocated device memory on GPU; on CPU the process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_bytes() -> int:
    """This process's resident set now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Start `peak_rss_bytes` over from the current resident set (ru_maxrss cannot be reset, and
    would carry a spawning parent's peak across fork+exec)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def peak_rss_bytes() -> int:
    """The peak resident set since the process started or `reset_peak_rss` (Linux's VmHWM)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
