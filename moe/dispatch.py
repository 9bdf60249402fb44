"""Choosing a token dispatcher by name: alltoall (default), deepep, hybridep.

Each backend is one module with a `build(group, hidden_size) -> Dispatcher`; adding one is that
file plus one line in `BACKENDS`. Modules are imported only when asked for. An optional backend
that cannot run here (not installed, no CUDA, an EP group or hidden size its kernels do not
support) raises RuntimeError from `build`, which falls back to alltoall with one logged line, or
raises when strict. Optional backends also have a `preflight(ep, hidden_size)`, the part of those
checks a process can make before any process group exists (launch validation, under strict).
"""

from __future__ import annotations

import importlib
import logging

import torch.distributed as dist

from moe.routing import Dispatcher

logger = logging.getLogger(__name__)

BACKENDS = {
    "alltoall": "moe.alltoall",
    "deepep": "moe.deepep",
    "hybridep": "moe.hybridep",
}
DISPATCHERS = tuple(BACKENDS)


def build_dispatcher(name: str, group: dist.ProcessGroup, hidden_size: int) -> Dispatcher:
    """The backend's dispatcher for rows of `hidden_size`; RuntimeError with the reason it cannot
    run here."""
    return importlib.import_module(BACKENDS[name]).build(group, hidden_size)


def preflight(name: str, ep: int, hidden_size: int) -> None:
    """RuntimeError with the reason optional backend `name` cannot run `ep` ranks of rows of
    `hidden_size`, as far as this process can tell without a process group."""
    importlib.import_module(BACKENDS[name]).preflight(ep, hidden_size)


_REPORTED: set[str] = set()


def resolve_dispatcher(name: str, strict: bool, ep_group: dist.ProcessGroup,
                       hidden_size: int) -> tuple[Dispatcher, str]:
    """The dispatcher to run for rows of `hidden_size` and a one-line reason for the start-up
    summary. For an optional backend, collective over `ep_group`, whose ranks all take the same
    decision.

    An unavailable optional backend falls back to alltoall with one logged line, or raises
    RuntimeError when `strict`.
    """
    if name not in BACKENDS:
        raise ValueError(f"moe dispatcher {name!r} unknown: choose one of {', '.join(DISPATCHERS)}")
    try:
        return build_dispatcher(name, ep_group, hidden_size), name
    except RuntimeError as exc:
        if name == "alltoall":
            raise
        reason = f"{name}: {exc} -> alltoall"
        if strict:
            raise RuntimeError(f"{name} dispatcher requested with strict=True but unavailable: {exc}") from exc
        if reason not in _REPORTED:  # once per process, however many stages or models resolve it
            _REPORTED.add(reason)
            logger.warning(reason)
        return build_dispatcher("alltoall", ep_group, hidden_size), reason
