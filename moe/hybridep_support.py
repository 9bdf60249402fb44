"""Whether HybridEP can serve an EP group, decided before its buffer is built.

HybridEP splits the group into NVLink domains: NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN ranks
each where that is set, else the ranks whose GPU memory it can open, one host's without
multi-node NVLink. A group over several domains needs deep_ep built with HYBRID_EP_MULTINODE=1
(RDMA between domains); the default build reaches an assert(false) in C++ when the buffer is
built at the first forward. The rules run at start on facts every rank reports (see
`gather_facts`), so such a group falls back to alltoall with the reason.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import socket
from dataclasses import dataclass

from moe.deep_ep_runtime import first_problem, host_block_size

DOMAIN_SIZE_VARIABLE = "NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN"
EXTENSION = "hybrid_ep_cpp"  # the compiled half of deep_ep's HybridEP, a top-level module


@dataclass(frozen=True)
class RankFacts:
    local_problem: str | None  # what rules HybridEP out on this rank alone (not installed, the row size, ...)
    host: str
    domain_size_setting: str | None  # NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN as this rank sees it
    multinode_build: bool | None


def multinode_build() -> bool | None:
    """Whether the HybridEP extension was built with HYBRID_EP_MULTINODE=1, which links it to the
    RDMA verbs library (the flag leaves no other trace but the C++ code it compiles in); None when
    the extension cannot be found or read."""
    try:
        spec = importlib.util.find_spec(EXTENSION)
        if spec is None or spec.origin is None:
            return None
        with open(spec.origin, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as image:
            return image.find(b"libibverbs.so") >= 0
    except (ImportError, OSError, ValueError):  # ValueError: an empty file cannot be mapped
        return None


def local_facts(local_problem: str | None) -> RankFacts:
    return RankFacts(local_problem, socket.gethostname(), os.environ.get(DOMAIN_SIZE_VARIABLE), multinode_build())


def domain_problem(world: int, domain_size: int, source: str, builds: set[bool | None]) -> str | None:
    """`builds`: what every rank's probe said of the multi-node build."""
    if domain_size <= 0 or world % domain_size:
        return f"EP size {world} is not a whole number of NVLink domains of {domain_size} ranks ({source})"
    if domain_size == world:
        return None
    spans = f"EP group of {world} ranks spans {world // domain_size} NVLink domains of {domain_size} ({source})"
    if False in builds:
        return f"{spans}, which deep_ep's intranode HybridEP build cannot serve: reinstall it with HYBRID_EP_MULTINODE=1"
    if None in builds:
        return (f"{spans}, which needs deep_ep's HybridEP built with HYBRID_EP_MULTINODE=1; cannot tell how it was "
                f"built ({EXTENSION} not found or unreadable)")
    return None


def setting_problem(world: int, setting: str, builds: set[bool | None]) -> str | None:
    """`domain_problem` with the domain size NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN=`setting`."""
    if not setting.strip().isdigit():
        return f"{DOMAIN_SIZE_VARIABLE}={setting!r} is not a whole number"
    return domain_problem(world, int(setting), f"{DOMAIN_SIZE_VARIABLE}={setting}", builds)


def group_problem(facts: list[RankFacts]) -> str | None:
    """The reason HybridEP cannot serve the group these facts describe, or None."""
    world = len(facts)
    problem = first_problem([f.local_problem for f in facts])
    settings = {f.domain_size_setting for f in facts}
    builds = {f.multinode_build for f in facts}
    if problem is not None:
        return problem
    if len(settings) > 1:
        return f"{DOMAIN_SIZE_VARIABLE} differs between the ranks ({', '.join(sorted(map(str, settings)))})"
    setting = settings.pop()
    if setting is not None:
        return setting_problem(world, setting, builds)
    size = host_block_size([f.host for f in facts])
    if size is None:
        return f"EP group of {world} ranks is not one block of consecutive ranks per host, as HybridEP's domains are"
    return domain_problem(world, size, f"one per host; with multi-node NVLink set {DOMAIN_SIZE_VARIABLE}", builds)
