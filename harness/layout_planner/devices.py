"""The devices a plan is made for: memory, peak FLOP/s, link bandwidths, stated efficiency."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import torch

GiB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    peak_tflops: float  # dense peak in the compute dtype, per rank
    intra_node_GBps: float  # per-rank bus bandwidth of a collective inside a node
    inter_node_GBps: float  # per-rank bandwidth of a collective that crosses nodes
    efficiency: float  # fraction of peak_tflops the layers' FLOPs reach (MFU of the compute alone)
    device_type: str  # "cuda" or "cpu": which kernels and which mixed precision the run uses
    reserve_bytes: int  # memory the run cannot use for its tensors (CUDA context, NCCL, allocator slack)
    # FSDP's collectives run beside the compute (NCCL on its own SMs and copy engines); gloo's
    # share the CPU cores the compute runs on.
    overlaps_communication: bool

    @property
    def compute_dtype(self) -> torch.dtype:
        """FSDP's mixed precision (parallel/fsdp.py): bf16 on CUDA, fp32 on CPU."""
        return torch.bfloat16 if self.device_type == "cuda" else torch.float32

    def describe(self) -> str:
        return (f"{self.name}: {self.memory_bytes / GiB:.0f} GiB, {self.peak_tflops:g} TFLOP/s x "
                f"{self.efficiency:g} efficiency, {self.intra_node_GBps:g} GB/s in a node, "
                f"{self.inter_node_GBps:g} GB/s across nodes")


def _cpu() -> Device:
    # One gloo process per core pair on a shared box: flops.py's per-core estimate, loopback TCP.
    cores = os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Device("cpu", memory, cores * 50.0 / 1000, intra_node_GBps=2.0, inter_node_GBps=1.0, efficiency=0.5,
                  device_type="cpu", reserve_bytes=0, overlaps_communication=False)


# H100 SXM: 80 GiB HBM3 (79.6 GiB as CUDA reports it), 989 TFLOP/s dense bf16, NVLink 4 (450 GB/s per direction, ~360 GB/s of
# all-gather bus bandwidth reached by NCCL), 400 Gb/s InfiniBand NIC per GPU (50 GB/s, ~40 reached).
# H200: the same chip with 141 GB HBM3e (140 GiB). Efficiency 0.5: what FSDP training of 7-70B dense models
# reaches in bf16 without float8 (TorchTitan and Megatron-Core report 40-55% MFU).
DEVICES = {
    "h100": Device("h100", 80 * GiB, 989.0, intra_node_GBps=360.0, inter_node_GBps=40.0, efficiency=0.5,
                   device_type="cuda", reserve_bytes=3 * GiB, overlaps_communication=True),
    "h200": Device("h200", 140 * GiB, 989.0, intra_node_GBps=360.0, inter_node_GBps=40.0, efficiency=0.5,
                   device_type="cuda", reserve_bytes=3 * GiB, overlaps_communication=True),
}


def device_names() -> list[str]:
    return [*DEVICES, "cpu"]


def named_device(name: str) -> Device:
    """A named device; ValueError (one line) for a name it does not know."""
    key = name.lower()
    if key == "cpu":
        return _cpu()
    if key not in DEVICES:
        raise ValueError(f"--device {name}: unknown device; choose one of {', '.join(device_names())}, or give "
                         "--device-memory, --peak-tflops and the bandwidths of another")
    return DEVICES[key]


def with_overrides(device: Device, memory: str | None = None, peak_tflops: float | None = None,
                   intra_node_GBps: float | None = None, inter_node_GBps: float | None = None,
                   efficiency: float | None = None) -> Device:
    """`device` with what the command line states instead; ValueError (one line) for a bad value."""
    changes = {}
    if memory is not None:
        changes["memory_bytes"] = parse_bytes(memory, "--device-memory")
    for flag, key, value in (("--peak-tflops", "peak_tflops", peak_tflops),
                             ("--intra-node-GBps", "intra_node_GBps", intra_node_GBps),
                             ("--inter-node-GBps", "inter_node_GBps", inter_node_GBps),
                             ("--efficiency", "efficiency", efficiency)):
        if value is not None:
            if not value > 0:
                raise ValueError(f"{flag}={value}: must be > 0")
            changes[key] = value
    if "efficiency" in changes and changes["efficiency"] > 1:
        raise ValueError(f"--efficiency={changes['efficiency']}: a fraction of the peak, in (0, 1]")
    return dataclasses.replace(device, **changes)


_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(text: str, flag: str) -> int:
    """'80GiB', '141GB', '512MiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{flag}={text}: give a positive size with a unit, e.g. 80GiB or 141GB")
    return int(float(match.group(1)) * _UNITS[unit])
