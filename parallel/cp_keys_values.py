"""The key and value heads of every rank of a context-parallel group, in one collective.

Keys and values [rows, heads, local, dim] (the KV heads, before any GQA expansion) are packed
sequence-major into one [local, width] tensor, so that a single all-gather along dim 0 brings the
whole sequence's keys and values, rank-major (`SequenceShard.gathered_index` says where each row
sits), and a single reduce-scatter sends their gradients home. Functional collectives, so that
selective activation checkpointing saves the gathered tensor
(`_c10d_functional.all_gather_into_tensor` is on its save list) and its recompute issues none.
"""

from __future__ import annotations

import torch

from parallel.context_parallel import SequenceShard


def pack(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[local, rows * heads * (key dim + value dim)]: sequence-major, so that a gather's dim 0 is the sequence."""
    local = key.shape[2]
    return torch.cat([key.permute(2, 0, 1, 3).reshape(local, -1), value.permute(2, 0, 1, 3).reshape(local, -1)], 1)


def unpack(packed: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of `packed` [length, width] as keys and values shaped like `key` and `value` but for
    their sequence length: [rows, heads, length, dim]."""
    rows, heads, _, key_dim = key.shape
    value_dim = value.shape[-1]
    keys, values = packed.split([rows * heads * key_dim, rows * heads * value_dim], dim=1)
    length = packed.shape[0]
    return (keys.reshape(length, rows, heads, key_dim).permute(1, 2, 0, 3),
            values.reshape(length, rows, heads, value_dim).permute(1, 2, 0, 3))


def all_gather(local: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    gathered = torch.ops._c10d_functional.all_gather_into_tensor(local.contiguous(), shard.size, shard.group_name)
    return torch.ops._c10d_functional.wait_tensor(gathered)


def reduce_scatter(gathered: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    summed = torch.ops._c10d_functional.reduce_scatter_tensor(gathered.contiguous(), "sum", shard.size,
                                                              shard.group_name)
    return torch.ops._c10d_functional.wait_tensor(summed)


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over the cp group; backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
        ctx.shard = shard
        return all_gather(local, shard)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return reduce_scatter(grad, ctx.shard), None


def gather_keys_values(key: torch.Tensor, value: torch.Tensor,
                       shard: SequenceShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value [rows, heads, local, dim] of every rank of the cp group:
    [rows, heads, size * local, dim], rank-major."""
    return unpack(_GatherSequence.apply(pack(key, value), shard), key, value)
