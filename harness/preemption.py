"""SIGUSR1 (SLURM's warning before the time limit or preemption) asks for a checkpoint and a
clean exit.

The handler only sets a flag; the loop sums it over all ranks after each step's backward, fused
with the step's metrics (`harness.trainer.agree_after_backward`), so every rank stops after the
same step even when the signal reached them at different times.
"""

from __future__ import annotations

import signal


class PreemptionRequest:
    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGUSR1, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
