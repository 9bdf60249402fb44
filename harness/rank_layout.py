"""One rank of a tensor- and context-parallel layout, on a fake process group, for ac.mode=budget's
fake-tensor step (parallel/ac_budget.py): the step runs the layer as a rank runs it, DTensor
shards, sequence-parallel redistributions and the key/value all-gather included, so its memory is
a rank's. A fake process group communicates nothing, and under fake tensors no collective runs;
it only gives the meshes and groups the parallel styles are built on.

Validation runs in the launcher, and in each worker before it joins its process group, so no
process group exists yet; the fake one is this process's default group for the measurement only.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch.distributed as dist
# Registers the "fake" backend (a process group that communicates nothing).
import torch.testing._internal.distributed.fake_pg  # noqa: F401
from torch import nn

from harness.model_parts import tensor_parallel_parts
from parallel.ac_budget import RankLayout
from parallel.context_parallel import SequenceShard
from parallel.cp_attention import use_context_parallel_attention
from parallel.mesh import ParallelDims, ParallelMeshes
from parallel.tensor_parallel import apply_tensor_parallel

T = TypeVar("T")


def rank_layout(meshes: ParallelMeshes, seq_len: int) -> RankLayout | None:
    """This rank's share of the layout of `meshes` (tensor and context parallel only; None when it
    has neither), applied to a meta-device model in the order `harness.parallelize` applies it."""
    tp, cp = meshes.tp.size(), meshes.cp.size()
    if tp == cp == 1:
        return None
    shard = SequenceShard(meshes.cp.get_group(), seq_len) if cp > 1 else None

    def parallelize(model: nn.Module) -> None:
        if shard is not None:
            use_context_parallel_attention(model, shard)
        if tp > 1:
            apply_tensor_parallel(tensor_parallel_parts(model), meshes.tp)

    return RankLayout(parallelize=parallelize, sequence_shard=shard)


def on_fake_rank(tp: int, cp: int, seq_len: int, measure: Callable[[RankLayout | None], T]) -> T:
    """`measure(layout)` on rank 0 of a tp x cp layout over sequences of `seq_len` tokens (None when
    both are 1), in a thread of its own. DTensor caches redistribution plans and mesh facts per
    mesh, and meshes compare equal across process groups (same ranks, dims and thread): in this
    thread, the real meshes a worker builds after validation would reuse what was computed for the
    fake rank 0 (rank 1 of tp=2 then read and saved rank 0's shards)."""
    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(_measure_on_fake_rank, tp, cp, seq_len, measure).result()


def _measure_on_fake_rank(tp: int, cp: int, seq_len: int, measure: Callable[[RankLayout | None], T]) -> T:
    """Every rank keeps the same activations: tensor parallel splits evenly, and context parallel's
    head-tail chunks give each rank keys up to the same total length."""
    if tp == cp == 1:
        return measure(None)
    assert not dist.is_initialized(), "the budget's fake layout is measured before any process group starts"
    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=tp * cp)
    try:
        dims = ParallelDims(pp=1, dp_replicate=1, dp_shard=1, cp=cp, tp=tp, ep=1, world_size=tp * cp)
        return measure(rank_layout(dims.build_meshes("cpu"), seq_len))
    finally:
        dist.destroy_process_group()
