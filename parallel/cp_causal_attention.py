"""Plain causal attention of a rank's two chunks over the whole sequence's keys, on CPU, without a mask.

Under context parallel a rank's queries are two chunks of the sequence, and each attends causally
to the keys up to its own end. Given as a bottom-right causal bias, torch's CPU flash kernel
materializes that bias and keeps it for backward as an fp32 [chunk, prefix] tensor: quadratic in
the sequence. Here each chunk's attention is split in two parts that need no mask: the chunk's
queries against every key before the chunk, and the chunk against itself under `is_causal`. Their
outputs merge by their log-sum-exps (out = sum_i exp(lse_i - L) out_i, L = logaddexp of the
lse_i), and backward runs the flash backward of each part with the merged output and L, which
gives each part's exact share of dQ, dK and dV (the softmax over all keys, restricted to the
part's keys).

Saved for backward: the queries, this rank's own key and value heads (before any GQA expansion:
the kernel broadcasts them), the merged output and L. The other ranks' keys and values are
gathered again in backward rather than kept, so that a rank's activations stay its share of the
sequence's; their gradients are reduce-scattered home, as the all-gather form does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from parallel.context_parallel import SequenceShard
from parallel.cp_keys_values import all_gather, pack, reduce_scatter, unpack

flash_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
flash_attention_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def merge(output: torch.Tensor, lse: torch.Tensor, other: torch.Tensor,
          other_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two attention outputs of the same queries over disjoint keys, and their log-sum-exps, as one."""
    merged = torch.logaddexp(lse, other_lse)
    output = (output.float() * (lse - merged).exp().unsqueeze(-1)
              + other.float() * (other_lse - merged).exp().unsqueeze(-1)).to(output.dtype)
    return output, merged


def padded(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """`tensor` with zeros appended to its head dim up to `width`. The kernel takes one head dim for
    queries, keys and values; zero columns change no score (the scale is passed explicitly) and
    give zero output columns (multi-head latent attention's values are narrower than its keys)."""
    return F.pad(tensor, (0, width - tensor.shape[-1])) if tensor.shape[-1] < width else tensor


def _parts(shard: SequenceShard) -> list[tuple[slice, slice, bool]]:
    """Per local chunk and part: its rows of the local queries, the global positions of its keys,
    and whether it is the causal (diagonal) part. The first chunk of the sequence has no keys before it."""
    parts = []
    for index, start in enumerate(shard.chunk_starts):
        rows = slice(index * shard.chunk, (index + 1) * shard.chunk)
        parts.append((rows, slice(start, start + shard.chunk), True))
        if start:
            parts.append((rows, slice(0, start), False))
    return parts


class _ChunkedCausalAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shard: SequenceShard,
                scale: float) -> torch.Tensor:
        ctx.shard, ctx.scale = shard, scale
        width = max(query.shape[-1], value.shape[-1])
        keys, values = unpack(all_gather(pack(key, value), shard), key, value)
        order = shard.sequence_order.to(key.device)
        queries = padded(query, width)
        outputs, lses = [], []
        for rows, span, causal in _parts(shard):
            output, lse = flash_attention(queries[:, :, rows], padded(keys[:, :, order[span]], width),
                                          padded(values[:, :, order[span]], width), 0.0, causal, scale=scale)
            if not causal:  # the diagonal part of the same chunk came just before
                outputs[-1], lses[-1] = merge(output, lse, outputs[-1], lses[-1])
                continue
            outputs.append(output)
            lses.append(lse)
        output = torch.cat(outputs, dim=2)[..., :value.shape[-1]]
        ctx.save_for_backward(query, key, value, output, torch.cat(lses, dim=2))
        return output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        query, key, value, output, lse = ctx.saved_tensors
        shard, scale = ctx.shard, ctx.scale
        width = max(query.shape[-1], value.shape[-1])
        keys, values = unpack(all_gather(pack(key, value), shard), key, value)
        order = shard.sequence_order.to(key.device)
        queries, output, grad = padded(query, width), padded(output, width), padded(grad, width)
        grad_query = torch.zeros_like(queries)
        # The gradients of the gathered keys and values, packed as the gather was, for one reduce-scatter.
        grad_packed = key.new_zeros(shard.size * key.shape[2], (key.numel() + value.numel()) // key.shape[2])
        grad_keys, grad_values = unpack(grad_packed, key, value)
        for rows, span, causal in _parts(shard):
            dq, dk, dv = flash_attention_backward(grad[:, :, rows].contiguous(), queries[:, :, rows],
                                                  padded(keys[:, :, order[span]], width),
                                                  padded(values[:, :, order[span]], width),
                                                  output[:, :, rows].contiguous(), lse[:, :, rows].contiguous(),
                                                  0.0, causal, scale=scale)
            grad_query[:, :, rows] += dq
            grad_keys.index_add_(2, order[span], dk[..., :key.shape[-1]])
            grad_values.index_add_(2, order[span], dv[..., :value.shape[-1]])
        grad_key, grad_value = unpack(reduce_scatter(grad_packed, shard), key, value)
        return grad_query[..., :query.shape[-1]], grad_key, grad_value, None, None


# Left to eager under train.compile: inductor's trace of this Function's backward (which gathers
# the other ranks' keys and values again) assumed strides the saved keys do not have at run time
# ("Cannot view a tensor with shape [local, rows, heads, dim] ... as [local, width]", torch 2.13).
@torch.compiler.disable
def chunked_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shard: SequenceShard,
                             scale: float | None) -> torch.Tensor:
    """Causal attention of this rank's queries [rows, heads, local, dim] over the keys and values of
    every rank of the cp group (this rank's: [rows, kv heads, local, dim]), each local chunk
    attending to the sequence up to its end: [rows, heads, local, value dim]."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return _ChunkedCausalAttention.apply(query, key, value, shard, scale)
