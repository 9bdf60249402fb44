"""Choosing a token dispatcher by name: alltoall (default), deepep, hybridep.

Each backend is one module with a `build(group) -> Dispatcher`; adding one is that file plus
one line in `BACKENDS`. Modules are imported only when asked for. An optional backend that
cannot run here (not installed, no CUDA, an EP group its kernels do not support) raises
RuntimeError from `build`, which falls back to alltoall with one logged line, or raises
when strict.
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


def build_dispatcher(name: str, group: dist.ProcessGroup) -> Dispatcher:
    """The backend's dispatcher; RuntimeError with the reason it cannot run here."""
    return importlib.import_module(BACKENDS[name]).build(group)


_REPORTED: set[str] = set()


def resolve_dispatcher(name: str, strict: bool, ep_group: dist.ProcessGroup) -> tuple[Dispatcher, str]:
    """The dispatcher to run and a one-line reason for the start-up summary.

    An unavailable optional backend falls back to alltoall with one logged line, or raises
    RuntimeError when `strict`.
    """
    if name not in BACKENDS:
        raise ValueError(f"moe dispatcher {name!r} unknown: choose one of {', '.join(DISPATCHERS)}")
    try:
        return build_dispatcher(name, ep_group), name
    except RuntimeError as exc:
        if name == "alltoall":
            raise
        reason = f"{name}: {exc} -> alltoall"
        if strict:
            raise RuntimeError(f"{name} dispatcher requested with strict=True but unavailable: {exc}") from exc
        if reason not in _REPORTED:  # once per process, however many stages or models resolve it
            _REPORTED.add(reason)
            logger.warning(reason)
        return build_dispatcher("alltoall", ep_group), reason
