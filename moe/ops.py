"""Expert-parallel dispatch and combine as torch custom ops (namespace "harness").

Both are an all-to-all of rows between the ranks of one process group, with uneven splits
(a rank may send or receive nothing). They are custom ops, not an autograd.Function around
the in-place `dist.all_to_all_single`, because selective activation checkpointing must see
them as single ops to save them: under a MUST_SAVE policy an autograd.Function wrapping the
in-place collective yields silently wrong gradients. The backward of dispatch is a combine
with the splits swapped, and vice versa, so a saved op is never replayed in backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from moe import deepep, hybridep  # noqa: F401  (register torch.ops.deepep.* and torch.ops.hybridep.*)


def _all_to_all(x: torch.Tensor, input_splits: list[int], output_splits: list[int], group_name: str) -> torch.Tensor:
    assert sum(input_splits) == x.shape[0], (input_splits, x.shape)
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=output_splits,
                           input_split_sizes=input_splits, group=_resolve_process_group(group_name))
    return out


def _fake_all_to_all(x: torch.Tensor, input_splits: list[int], output_splits: list[int], group_name: str) -> torch.Tensor:
    return x.new_empty((sum(output_splits), *x.shape[1:]))


@torch.library.custom_op("harness::ep_dispatch", mutates_args=())
def ep_dispatch(x: torch.Tensor, input_splits: list[int], output_splits: list[int], group_name: str) -> torch.Tensor:
    """Rows of `x`, grouped by destination rank (`input_splits[r]` rows for rank r), sent out;
    returns the rows received, grouped by source rank (`output_splits[r]` from rank r)."""
    return _all_to_all(x, input_splits, output_splits, group_name)


@torch.library.custom_op("harness::ep_combine", mutates_args=())
def ep_combine(x: torch.Tensor, input_splits: list[int], output_splits: list[int], group_name: str) -> torch.Tensor:
    """The way back: expert outputs returned to the ranks their tokens came from."""
    return _all_to_all(x, input_splits, output_splits, group_name)


ep_dispatch.register_fake(_fake_all_to_all)
ep_combine.register_fake(_fake_all_to_all)


def _setup_context(ctx, inputs, output) -> None:
    _, ctx.input_splits, ctx.output_splits, ctx.group_name = inputs


def _dispatch_backward(ctx, grad: torch.Tensor):
    return torch.ops.harness.ep_combine(grad, ctx.output_splits, ctx.input_splits, ctx.group_name), None, None, None


def _combine_backward(ctx, grad: torch.Tensor):
    return torch.ops.harness.ep_dispatch(grad, ctx.output_splits, ctx.input_splits, ctx.group_name), None, None, None


ep_dispatch.register_autograd(_dispatch_backward, setup_context=_setup_context)
ep_combine.register_autograd(_combine_backward, setup_context=_setup_context)

# Every communication op moe registers: selective activation checkpointing must save them
# rather than replay them in backward. The callers hand these to parallel/activation_checkpointing.py.
SAC_SAVE_OPS = (
    torch.ops.harness.ep_dispatch.default, torch.ops.harness.ep_combine.default,
    torch.ops.deepep.dispatch.default, torch.ops.deepep.combine.default,
    torch.ops.hybridep.dispatch.default, torch.ops.hybridep.combine.default,
)
