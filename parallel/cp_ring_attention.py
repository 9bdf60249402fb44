"""The ring form of context parallel's plain causal attention, on CPU (`parallel.cp_rotate=ring`).

Instead of all-gathering the keys and values, each rank passes its block (the key and value heads
of its two chunks) to the next rank of the cp group and receives the previous rank's, cp - 1
times; while a block travels, the rank attends its two query chunks to the block it holds. A
query chunk attends to a key chunk before it in full, to itself under `is_causal`, and not to a
chunk after it; the parts merge by their log-sum-exps, as in parallel/cp_causal_attention.py.
Backward passes the blocks around again, with the gradient of each block travelling beside it
and arriving home after the last step. A rank holds at most two blocks at a time.

It is a custom op so that selective activation checkpointing saves its output and log-sum-exp
as a whole (the caller hands SAC_SAVE_OPS to parallel/activation_checkpointing.py): its
recompute then sends nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from parallel.context_parallel import SequenceShard
from parallel.cp_causal_attention import flash_attention, flash_attention_backward, merge, padded


def _exchange(send: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, list]:
    """Starts sending `send` to the next rank of `group` and receiving the previous rank's like it."""
    size, rank = group.size(), group.rank()
    received = torch.empty_like(send)
    requests = dist.batch_isend_irecv([
        dist.P2POp(dist.isend, send, dist.get_global_rank(group, (rank + 1) % size), group),
        dist.P2POp(dist.irecv, received, dist.get_global_rank(group, (rank - 1) % size), group)])
    return received, requests


def _chunk_ids(rank: int, size: int) -> tuple[int, int]:
    """The global chunk indices (of 2 x size) rank `rank` holds: head-tail."""
    return rank, 2 * size - 1 - rank


def _pairs(rank: int, source: int, size: int, chunk: int) -> list[tuple[slice, slice, bool]]:
    """The query chunk rows and key chunk rows (of the block from rank `source`) that attend, and
    whether causally (the same chunk)."""
    pairs = []
    for query_index, query_chunk in enumerate(_chunk_ids(rank, size)):
        for key_index, key_chunk in enumerate(_chunk_ids(source, size)):
            if key_chunk <= query_chunk:
                pairs.append((slice(query_index * chunk, (query_index + 1) * chunk),
                              slice(key_index * chunk, (key_index + 1) * chunk), key_chunk == query_chunk))
    return pairs


@torch.library.custom_op("cp_ring::causal_attention", mutates_args=())
def ring_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group_name: str,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's causal attention output [rows, heads, local, value dim] and log-sum-exp
    [rows, heads, local] (fp32) over the whole sequence, from this rank's queries, keys and values."""
    group = _resolve_process_group(group_name)
    size, rank, chunk = group.size(), group.rank(), query.shape[2] // 2
    width, key_dim = max(query.shape[-1], value.shape[-1]), key.shape[-1]
    queries = padded(query, width)
    block = torch.cat([key, value], dim=-1).contiguous()
    outputs: list[torch.Tensor | None] = [None, None]
    lses: list[torch.Tensor | None] = [None, None]
    for step in range(size):
        if step < size - 1:
            following, requests = _exchange(block, group)
        keys, values = padded(block[..., :key_dim], width), padded(block[..., key_dim:], width)
        for rows, columns, causal in _pairs(rank, (rank - step) % size, size, chunk):
            output, lse = flash_attention(queries[:, :, rows], keys[:, :, columns], values[:, :, columns], 0.0,
                                          causal, scale=scale)
            index = rows.start // chunk
            if outputs[index] is not None:
                output, lse = merge(output, lse, outputs[index], lses[index])
            outputs[index], lses[index] = output, lse
        if step < size - 1:
            for request in requests:
                request.wait()
            block = following
    return torch.cat(outputs, dim=2)[..., :value.shape[-1]].contiguous(), torch.cat(lses, dim=2)


@ring_causal_attention.register_fake
def _(query, key, value, group_name, scale):
    return query.new_empty(*query.shape[:-1], value.shape[-1]), query.new_empty(query.shape[:-1], dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, ctx.group_name, ctx.scale = inputs
    ctx.save_for_backward(query, key, value, *output)


def _backward(ctx, grad: torch.Tensor, _grad_lse: torch.Tensor) -> tuple:
    query, key, value, output, lse = ctx.saved_tensors
    group = _resolve_process_group(ctx.group_name)
    size, rank, chunk = group.size(), group.rank(), query.shape[2] // 2
    width, key_dim = max(query.shape[-1], value.shape[-1]), key.shape[-1]
    queries, output, grad = padded(query, width), padded(output, width), padded(grad, width)
    grad_query = torch.zeros_like(queries)
    block = torch.cat([key, value], dim=-1).contiguous()
    grad_block = torch.zeros_like(block)  # the gradient of the block held, travelling with it
    for step in range(size):
        if step < size - 1:
            following, requests = _exchange(block, group)
        keys, values = padded(block[..., :key_dim], width), padded(block[..., key_dim:], width)
        for rows, columns, causal in _pairs(rank, (rank - step) % size, size, chunk):
            dq, dk, dv = flash_attention_backward(grad[:, :, rows].contiguous(), queries[:, :, rows],
                                                  keys[:, :, columns], values[:, :, columns],
                                                  output[:, :, rows].contiguous(), lse[:, :, rows].contiguous(),
                                                  0.0, causal, scale=ctx.scale)
            grad_query[:, :, rows] += dq
            grad_block[:, :, columns, :key_dim] += dk[..., :key_dim]
            grad_block[:, :, columns, key_dim:] += dv[..., :value.shape[-1]]
        # After the last step the gradient held is the next rank's block's: one more hop takes every
        # gradient home.
        sent = grad_block
        grad_block, grad_requests = _exchange(sent, group)
        for request in grad_requests:
            request.wait()
        if step < size - 1:
            for request in requests:
                request.wait()
            block = following
    return (grad_query[..., :query.shape[-1]], grad_block[..., :key_dim], grad_block[..., key_dim:], None, None)


ring_causal_attention.register_autograd(_backward, setup_context=_setup_context)

# What selective activation checkpointing must save rather than replay in backward.
SAC_SAVE_OPS = (torch.ops.cp_ring.causal_attention.default,)


def ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shard: SequenceShard,
                   scale: float | None) -> torch.Tensor:
    """`chunked_causal_attention`'s result, by the ring: [rows, heads, local, value dim]."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return ring_causal_attention(query, key, value, shard.group_name, scale)[0]
