"""A parameter shared by the first and the last pipeline stage (tied input and output embeddings).

Each of the two stages holds its own copy of the weight. After backward their gradients are
summed (as Megatron does for shared embeddings): both copies then hold the one-process gradient,
and the same optimizer update keeps them equal. Gradient clipping counts the weight once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def first_last_stage_group(world: DeviceMesh, last_stage_rank: int) -> dist.ProcessGroup | None:
    """The group of this rank's pp peers holding the first (pp rank 0) and last stage, for every
    data-parallel coordinate; None on the ranks between them. A collective: every rank calls it."""
    assert world.mesh_dim_names[0] == "pp", world.mesh_dim_names
    mine = None
    me = dist.get_rank()
    for column in world.mesh.reshape(world.mesh.shape[0], -1).t().tolist():
        ranks = sorted({column[0], column[last_stage_rank]})
        group = dist.new_group(ranks) if len(ranks) > 1 else None
        if me in ranks:
            mine = group
    return mine


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class TiedAcrossStages:
    """This rank's copies of a weight tied between the first stage (`first`, e.g. the input
    embedding) and the last (`last`, e.g. the LM head); None where this rank holds no such stage."""

    def __init__(self, first: nn.Parameter | None, last: nn.Parameter | None,
                 group: dist.ProcessGroup | None) -> None:
        self.copies = [p for p in (first, last) if p is not None]
        self.last = last
        self.group = group

    @property
    def uncounted(self) -> list[nn.Parameter]:
        """The copy a gradient norm must leave out: the weight is counted once, on the first stage."""
        return [self.last] if self.last is not None else []

    def copy_first_to_last(self) -> None:
        """Makes the last stage's copy equal the first's (a collective over the first/last group),
        whatever each was initialised or loaded with."""
        if not self.copies:
            return
        with torch.no_grad():
            value = _local(self.copies[0]).clone() if self.last is not self.copies[0] else torch.zeros_like(_local(self.last))
            if self.group is not None:
                # The first stage's rank sends its copy; the last stage's contributes zeros.
                dist.all_reduce(value, group=self.group)
            if self.last is not None:
                _local(self.last).copy_(value)

    def sum_gradients(self) -> None:
        """Both copies get the sum of their gradients (a collective over the first/last group)."""
        if not self.copies:
            return
        for param in self.copies:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            elif isinstance(param.grad, DTensor) and param.grad.placements != param.placements:
                # Tensor parallel's embedding backward leaves a replicated gradient of the
                # vocabulary-sharded weight; the head's is sharded. Slicing it is local.
                param.grad = param.grad.redistribute(placements=param.placements)
        total = torch.stack([_local(param.grad) for param in self.copies]).sum(0)
        if self.group is not None:
            dist.all_reduce(total, group=self.group)
        for param in self.copies:
            _local(param.grad).copy_(total)
