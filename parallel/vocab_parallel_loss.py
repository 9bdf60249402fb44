"""Cross entropy over vocabulary-sharded logits, without gathering them (Megatron's vocab-parallel
cross entropy): each rank holds a slice of the vocabulary for every token; the maximum, the sum of
exponentials and the target's logit are all-reduced over the tensor-parallel group (three
all-reduces of one value per token), and the backward is local (softmax minus the one-hot, on
this rank's slice). torch's `loss_parallel` does the same but must also wrap the backward, which
runs in the trainer and the pipeline schedules; this one is an autograd function of its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard


class _VocabParallelCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, ignore_index: int,
                group: dist.ProcessGroup) -> torch.Tensor:
        # The maximum only keeps exp() in range; any value shared by the ranks gives the same loss.
        maximum = logits.detach().max(dim=-1).values
        dist.all_reduce(maximum, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - maximum.unsqueeze(-1)
        exponentials = shifted.exp()
        sum_exp = exponentials.sum(dim=-1)
        local_labels = labels - vocab_start
        here = (local_labels >= 0) & (local_labels < logits.shape[-1])
        target = shifted.gather(-1, local_labels.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1) * here
        reduced = torch.stack([sum_exp, target])
        dist.all_reduce(reduced, group=group)
        sum_exp, target = reduced
        counted = labels != ignore_index
        ctx.save_for_backward(exponentials / sum_exp.unsqueeze(-1), local_labels, here & counted, counted)
        return ((sum_exp.log() - target) * counted).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, local_labels, target_here, counted = ctx.saved_tensors
        grad_logits = softmax * counted.unsqueeze(-1)
        # Minus one at each target this rank holds, plus zero elsewhere (the same bits): a scatter
        # of a fixed shape, which fake tensors (the budget's measurement) take and CUDA runs without
        # the host sync of selecting the rows first.
        index = local_labels.clamp(0, softmax.shape[-1] - 1).unsqueeze(-1)
        grad_logits.scatter_add_(-1, index, -target_here.unsqueeze(-1).to(grad_logits.dtype))
        return grad_logits * grad, None, None, None, None


def vocab_parallel_cross_entropy_sum(logits: DTensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Sum of the cross entropies of `logits` ([..., vocab], sharded along the vocabulary over a
    1-D mesh in equal slices) against `labels` ([...]), skipping `ignore_index`; the same plain
    tensor on every rank of the mesh."""
    mesh = logits.device_mesh
    (placement,) = logits.placements
    assert isinstance(placement, Shard) and placement.dim in (-1, logits.ndim - 1), logits.placements
    local = logits.to_local()
    assert local.shape[-1] * mesh.size() == logits.shape[-1], "the vocabulary splits evenly over the ranks"
    vocab_start = mesh.get_local_rank() * local.shape[-1]
    return _VocabParallelCrossEntropySum.apply(local.flatten(0, -2).float(), labels.flatten(), vocab_start,
                                               ignore_index, mesh.get_group())
