"""Plain causal attention of a rank's two chunks over the gathered keys, on CPU, without a mask.

Under context parallel a rank's queries are two chunks of the sequence, and each attends causally
to the keys up to its own end. Given as a bottom-right causal bias, torch's CPU flash kernel
materializes that bias and keeps it for backward as an fp32 [chunk, prefix] tensor: quadratic in
the sequence. Here each chunk's attention is split in two parts that need no mask: the chunk's
queries against every key before the chunk, and the chunk against itself under `is_causal`. Their
outputs merge by their log-sum-exps (out = sum_i exp(lse_i - L) out_i, L = logaddexp of the
lse_i), and backward runs the flash backward of each part with the merged output and L, which
gives each part's exact share of dQ, dK and dV (the softmax over all keys, restricted to the
part's keys). Saved for backward: the queries, the gathered key and value heads (before any GQA
expansion: the kernel broadcasts them), the merged output and L.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from parallel.context_parallel import SequenceShard

_attend = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_attend_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _padded(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """`tensor` with zeros appended to its head dim up to `width`. The kernel takes one head dim for
    queries, keys and values; zero columns change no score (the scale is passed explicitly) and
    give zero output columns (multi-head latent attention's values are narrower than its keys)."""
    return F.pad(tensor, (0, width - tensor.shape[-1])) if tensor.shape[-1] < width else tensor


def _parts(shard: SequenceShard) -> list[tuple[slice, int]]:
    """Per local chunk: its rows of the local queries and its first global position."""
    return [(slice(index * shard.chunk, (index + 1) * shard.chunk), start)
            for index, start in enumerate(shard.local_index[::shard.chunk].tolist())]


class _ChunkedCausalAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shard: SequenceShard,
                scale: float) -> torch.Tensor:
        ctx.shard, ctx.scale, ctx.value_dim = shard, scale, value.shape[-1]
        width = max(query.shape[-1], ctx.value_dim)
        order = shard.sequence_order.to(key.device)
        keys, values = _padded(key[:, :, order], width), _padded(value[:, :, order], width)
        queries = _padded(query, width)
        outputs, lses = [], []
        for rows, start in _parts(shard):
            end = start + shard.chunk
            output, lse = _attend(queries[:, :, rows], keys[:, :, start:end], values[:, :, start:end], 0.0, True,
                                  scale=scale)
            if start:
                before, before_lse = _attend(queries[:, :, rows], keys[:, :, :start], values[:, :, :start], 0.0,
                                             False, scale=scale)
                merged_lse = torch.logaddexp(lse, before_lse)
                output = (output.float() * (lse - merged_lse).exp().unsqueeze(-1)
                          + before.float() * (before_lse - merged_lse).exp().unsqueeze(-1)).to(output.dtype)
                lse = merged_lse
            outputs.append(output)
            lses.append(lse)
        output = torch.cat(outputs, dim=2)[..., :ctx.value_dim]
        ctx.save_for_backward(query, key, value, output, torch.cat(lses, dim=2))
        return output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        query, key, value, output, lse = ctx.saved_tensors
        shard, scale = ctx.shard, ctx.scale
        width = max(query.shape[-1], ctx.value_dim)
        order = shard.sequence_order.to(key.device)
        keys, values = _padded(key[:, :, order], width), _padded(value[:, :, order], width)
        queries, output, grad = _padded(query, width), _padded(output, width), _padded(grad, width)
        grad_query = torch.zeros_like(queries)
        grad_keys, grad_values = torch.zeros_like(keys), torch.zeros_like(values)
        for rows, start in _parts(shard):
            end = start + shard.chunk
            chunk_args = (grad[:, :, rows].contiguous(), queries[:, :, rows])
            chunk_out = (output[:, :, rows].contiguous(), lse[:, :, rows].contiguous())
            spans = [(slice(start, end), True)] + ([(slice(0, start), False)] if start else [])
            for span, causal in spans:
                dq, dk, dv = _attend_backward(*chunk_args, keys[:, :, span], values[:, :, span], *chunk_out,
                                              0.0, causal, scale=scale)
                grad_query[:, :, rows] += dq
                grad_keys[:, :, span] += dk
                grad_values[:, :, span] += dv
        # Back from sequence order to the gathered (rank-major) order of the keys given.
        gathered = shard.gathered_index.to(key.device)
        return (grad_query[..., :query.shape[-1]], grad_keys[:, :, gathered][..., :key.shape[-1]],
                grad_values[:, :, gathered][..., :ctx.value_dim], None, None)


def chunked_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shard: SequenceShard,
                             scale: float | None) -> torch.Tensor:
    """Causal attention of this rank's queries [rows, heads, local, dim] over the gathered keys and
    values [rows, kv heads, seq_len, dim] (rank-major, as `gather_keys_values` returns them), each
    local chunk attending to the sequence up to its end: [rows, heads, local, value dim]."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return _ChunkedCausalAttention.apply(query, key, value, shard, scale)
