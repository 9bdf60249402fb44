"""This process's GPU as DeepEP's start-up checks need it: its name, its UUID and its NVLink peers.

Every probe answers None where it cannot run (no CUDA device, no NVML, a driver error), so a
check built on them can say "unknown" instead of failing the run.
"""

from __future__ import annotations

import torch


def gpu_name() -> str | None:
    try:
        return torch.cuda.get_device_name()
    except Exception:  # a CPU build of torch asserts, a broken driver raises RuntimeError
        return None


def gpu_uuid() -> str | None:
    """This process's GPU as NVML names it ("GPU-<uuid>"), whatever CUDA_VISIBLE_DEVICES holds."""
    try:
        return f"GPU-{torch.cuda.get_device_properties(torch.cuda.current_device()).uuid}"
    except Exception:  # as in gpu_name
        return None


def nvlink_peers(uuid: str) -> frozenset[str] | None:
    """UUIDs of the GPUs of this host that NVML reports NVLink peer-to-peer with GPU `uuid`; None
    when NVML cannot say (pynvml, from nvidia-ml-py, not installed; no driver; a MIG instance)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # ImportError, or NVMLError where there is no driver
        return None
    try:
        mine = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        peers = set()
        for index in range(pynvml.nvmlDeviceGetCount()):
            other = pynvml.nvmlDeviceGetHandleByIndex(index)
            other_uuid = pynvml.nvmlDeviceGetUUID(other)
            other_uuid = other_uuid.decode() if isinstance(other_uuid, bytes) else other_uuid  # older pynvml: bytes
            if other_uuid != uuid and pynvml.nvmlDeviceGetP2PStatus(
                    mine, other, pynvml.NVML_P2P_CAPS_INDEX_NVLINK) == pynvml.NVML_P2P_STATUS_OK:
                peers.add(other_uuid)
        return frozenset(peers)
    except Exception:  # NVMLError: an unknown UUID, a query the driver does not support
        return None
    finally:
        pynvml.nvmlShutdown()
