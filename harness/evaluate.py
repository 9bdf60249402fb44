"""Validation loss and perplexity on the held-out split, every `eval.every` steps."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from harness.data import BatchSampler
from harness.loss import count_tokens, token_loss_sum
from parallel.context_parallel import SequenceShard, forward_arguments


@torch.no_grad()  # also keeps the MoE load counters and the balancing bias out of it
def evaluate(model: nn.Module, sampler: BatchSampler, eval_steps: int, micro_batch_size: int, document_mask: bool,
             dp_group: dist.ProcessGroup, token_group: dist.ProcessGroup, device: torch.device,
             shard: SequenceShard | None = None) -> dict[str, float]:
    """Mean token loss over the first `eval_steps` held-out global batches (the same batches at
    every call, so values compare across steps) and its perplexity; `dp_group` reads different
    samples, `token_group` (dp x cp) holds different tokens, and sums the loss."""
    dp_rank, dp_size = dist.get_rank(dp_group), dist.get_world_size(dp_group)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, tokens
    model.eval()
    try:
        for step in range(eval_steps):
            inputs, labels = sampler.local_batch(step, dp_rank, dp_size)
            positions = sampler.position_ids(step, dp_rank, dp_size).to(device) if document_mask else None
            if shard is not None:
                inputs, labels = shard.split(inputs), shard.split(labels)
            for start in range(0, inputs.shape[0], micro_batch_size):
                rows = slice(start, start + micro_batch_size)
                documents = positions[rows] if positions is not None else None
                extra, forward = forward_arguments(shard, inputs[rows].shape[0], documents, device)
                with forward:
                    logits = model(input_ids=inputs[rows].to(device), **extra).logits
                totals[0] += token_loss_sum(logits, labels[rows].to(device)).double()
                totals[1] += count_tokens(labels[rows].to(device)).double()
    finally:
        model.train()
    dist.all_reduce(totals, group=token_group)
    loss = (totals[0] / totals[1]).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}
