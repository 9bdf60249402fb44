"""Whether DeepEP's normal kernels can serve an EP group, decided before its buffer is built.

Upstream checks the group's placement and GPUs when the buffer is built at the first forward,
with asserts that end the run. The same rules run here at start on facts every rank reports (see
`gather_facts`), so a group they rule out falls back to alltoall with the reason.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from moe.deep_ep_runtime import first_problem, host_block_size
from moe.gpu_probe import gpu_name, gpu_uuid, nvlink_peers

# Intranode kernels: all ranks of the group on one NVLink host, in groups of these sizes.
INTRANODE_EP_SIZES = (2, 4, 8)
# Internode kernels: NVLink within a host (NUM_MAX_NVL_PEERS in DeepEP), RDMA between hosts.
RANKS_PER_HOST_INTERNODE = 8


@dataclass(frozen=True)
class RankFacts:
    local_problem: str | None  # what rules DeepEP out on this rank alone (not installed, the row size, ...)
    host: str
    gpu_name: str | None
    gpu_uuid: str | None
    nvlink_peers: frozenset[str] | None  # probed on PCIe cards only, the ones upstream checks NVLink for


def is_pcie(name: str) -> bool:
    # Upstream's own test (deep_ep's check_nvlink_connections): the device name says PCIE.
    return "PCIE" in name


def local_facts(local_problem: str | None) -> RankFacts:
    name, uuid = gpu_name(), gpu_uuid()
    peers = nvlink_peers(uuid) if name is not None and is_pcie(name) and uuid is not None else None
    return RankFacts(local_problem, socket.gethostname(), name, uuid, peers)


def pcie_problem(name: str | None, world: int) -> str | None:
    """Upstream asserts that PCIe cards, which have NVLink between pairs at most, run 2 ranks at most."""
    if name is None:
        return "cannot read the GPU's name, which DeepEP checks for PCIe cards"
    if is_pcie(name) and world > 2:
        return (f"{name} is a PCIe card: DeepEP's kernels need NVLink between every pair of the {world} ranks, "
                "which PCIe cards have between pairs at most (ep=2 on an NVLink-bridged pair)")
    return None


def placement_problem(hosts: list[str]) -> str | None:
    world = len(hosts)
    if len(set(hosts)) == 1:
        if world not in INTRANODE_EP_SIZES:
            return f"EP size {world} unsupported on one host (intranode kernels: {INTRANODE_EP_SIZES})"
        return None
    # Upstream picks the intranode (NVLink IPC) path whenever the group has <= 8 ranks, which
    # fails in Buffer() when those ranks sit on several hosts.
    if host_block_size(hosts) != RANKS_PER_HOST_INTERNODE:
        return (f"EP group of {world} ranks spans {len(set(hosts))} hosts: DeepEP's internode kernels "
                f"need {RANKS_PER_HOST_INTERNODE} consecutive ranks on each host")
    return None


def nvlink_pair_problem(facts: list[RankFacts]) -> str | None:
    """Upstream asserts (with pynvml) that two PCIe ranks of one host are NVLink-bridged."""
    if len(facts) != 2 or not any(f.gpu_name is not None and is_pcie(f.gpu_name) for f in facts):
        return None
    first, second = facts
    if first.nvlink_peers is None or second.nvlink_peers is None:
        return ("cannot check that the 2 PCIe GPUs are NVLink-bridged, which DeepEP asserts at its first forward "
                "(NVML unavailable: install nvidia-ml-py)")
    if second.gpu_uuid not in first.nvlink_peers:
        return f"the 2 PCIe GPUs ({first.gpu_uuid}, {second.gpu_uuid}) are not NVLink-bridged, which DeepEP needs"
    return None


def group_problem(facts: list[RankFacts]) -> str | None:
    """The reason DeepEP cannot serve the group these facts describe, or None."""
    problems = [first_problem([f.local_problem for f in facts]), placement_problem([f.host for f in facts])]
    problems += [pcie_problem(name, len(facts)) for name in dict.fromkeys(f.gpu_name for f in facts)]
    problems.append(nvlink_pair_problem(facts))
    return next((problem for problem in problems if problem is not None), None)
