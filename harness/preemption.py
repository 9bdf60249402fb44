"""SIGUSR1 (SLURM's warning before the time limit or preemption) asks for a checkpoint and a
clean exit.

The handler only sets a flag; the loop asks `agreed()` at each step boundary, which takes the
maximum over all ranks, so every rank stops after the same step even when the signal reached
them at different times.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class PreemptionRequest:
    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGUSR1, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
