"""What a pipeline schedule costs: microbatches whose activations a rank holds at once, and the
idle share of the step (the bubble).

In flight, as torch's schedules order their work (rank r of pp, v stages per rank, m
microbatches; counted in microbatches through all of the rank's layers):
- GPipe: all m forwards before any backward: m.
- 1F1B: pp - r warm-up forwards, then one forward per backward: min(m, pp - r).
- Interleaved1F1B / InterleavedZeroBubble: (v - 1) x pp + 2 x (pp - 1 - r) + 1 stage-forwards of
  1/v of the rank's layers each (torch's warm-up count).
- LoopedBFS: every stage's forwards first: m.
- ZBVZeroBubble: 2 x pp stage-forwards of half the rank's layers: pp (the ZB-V paper's 1F1B memory).
- DualPipeV: pp + 1 (the DualPipe paper's activation memory, one microbatch more than 1F1B).

Bubble over the compute of a step: (pp - 1) / m for GPipe and 1F1B, over v for interleaved
placements; zero-bubble schedules split backward into input and weight gradients and fill
two thirds of that (the ZB-H1 figure); ZB-V and DualPipeV, (pp - 1) / (3 x m x v) and
(pp / 2 - 1) / m as their papers state.
"""

from __future__ import annotations


def in_flight(schedule: str | None, pp: int, stages_per_rank: int, microbatches: int, rank: int) -> float:
    """Microbatches (through all of the rank's layers) whose activations rank `rank` holds at its peak."""
    m, v = microbatches, stages_per_rank
    if pp == 1:
        return 1.0
    if schedule in ("GPipe", "LoopedBFS"):
        return float(m)
    if schedule == "1F1B":
        return float(min(m, pp - rank))
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        return min(m * v, (v - 1) * pp + 2 * (pp - 1 - rank) + 1) / v
    if schedule == "ZBVZeroBubble":
        return float(min(m, pp))
    if schedule == "DualPipeV":
        return float(min(m, pp + 1))
    raise AssertionError(f"no memory model for schedule {schedule}")


def bubble_fraction(schedule: str | None, pp: int, stages_per_rank: int, microbatches: int) -> float:
    """Idle time over compute time of one pipeline pass."""
    m, v = microbatches, stages_per_rank
    if pp == 1:
        return 0.0
    if schedule in ("GPipe", "1F1B"):
        return (pp - 1) / m
    if schedule in ("Interleaved1F1B", "LoopedBFS"):
        return (pp - 1) / (m * v)
    if schedule in ("InterleavedZeroBubble", "ZBVZeroBubble"):
        return (pp - 1) / (3 * m * v)
    if schedule == "DualPipeV":
        return max(pp / 2 - 1, 0) / m
    raise AssertionError(f"no bubble model for schedule {schedule}")
