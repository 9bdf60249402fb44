"""Observe expert-parallel traffic: every harness.ep_dispatch / ep_combine call and the
rows it sends, seen from a TorchDispatchMode (so a call served from an activation-checkpoint
cache, which never runs, is not counted). Used by the expert-parallel benchmark and the MoE tests."""

from __future__ import annotations

import time
from dataclasses import dataclass
from math import prod

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe import ops  # noqa: F401  (registers the ops observed here)


@dataclass
class Transfer:
    op: str            # "ep_dispatch" or "ep_combine"
    row_shape: tuple   # shape of one row ((hidden,) for hidden states, (1,) for counts)
    dtype: torch.dtype
    rows: int          # rows sent, to this rank included
    remote_rows: int   # rows sent to other ranks
    seconds: float     # wall time of the call, waiting for peers included

    @property
    def bytes(self) -> int:
        return self.rows * prod(self.row_shape) * torch.empty((), dtype=self.dtype).element_size()


class TrafficLog(TorchDispatchMode):
    """Use as a context manager on one rank; `rank` is this rank's index in the EP group."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.transfers: list[Transfer] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.harness.ep_dispatch.default, torch.ops.harness.ep_combine.default):
            x, input_splits = args[0], args[1]
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            self.transfers.append(Transfer(func._opname, tuple(x.shape[1:]), x.dtype, sum(input_splits),
                                           sum(input_splits) - input_splits[self.rank], time.perf_counter() - start))
            return out
        return func(*args, **(kwargs or {}))

    def seconds(self) -> float:
        return sum(t.seconds for t in self.transfers)

    def calls(self, op: str) -> int:
        return sum(t.op == op for t in self.transfers)

    def hidden_bytes(self, op: str, hidden: int) -> int:
        """Bytes of hidden-state rows (width `hidden`) sent by `op`: the payload, not the routing."""
        return sum(t.bytes for t in self.transfers if t.op == op and t.row_shape == (hidden,))
