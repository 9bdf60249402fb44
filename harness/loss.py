"""Causal-LM loss summed over tokens; callers divide by the global token count of the step,
so that gradients summed over microbatches and data-parallel ranks equal the one-process mean."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from parallel.vocab_parallel_loss import vocab_parallel_cross_entropy_sum

IGNORE_INDEX = -100


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross entropies; `labels` are already shifted (labels[t] = input[t+1]).
    Tensor-parallel logits arrive sharded along the vocabulary and are never gathered."""
    if isinstance(logits, DTensor):
        return vocab_parallel_cross_entropy_sum(logits, labels, IGNORE_INDEX)
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_tokens(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).sum()
