"""ParallelDims: sizes, validation, and the groups of each mesh view on real gloo ranks."""

import pytest
import torch.distributed as dist

from parallel.mesh import ParallelDims
from tests.multiproc import run_ranks

LAYOUTS = [dict(dp_shard=4), dict(pp=2, dp_shard=2, ep=2), dict(dp_replicate=2, dp_shard=2, ep=2),
           dict(dp_shard=4, ep=2), dict(dp_shard=2, tp=2), dict(dp_replicate=2, tp=2, dp_shard=1),
           dict(dp_shard=2, cp=2), dict(dp_replicate=2, cp=2, dp_shard=1), dict(cp=2, ep=2, dp_shard=2),
           dict(pp=2, cp=2, dp_shard=1), dict(cp=2, tp=2, dp_shard=1), dict(dp_shard=2, tp=2, ep=2)]


def test_dp_shard_fills_the_world_and_ep_borrows_from_it():
    dims = ParallelDims(pp=2, dp_shard=-1, ep=2, world_size=8)
    assert (dims.dp_shard, dims.dp, dims.efsdp) == (4, 4, 2)


def test_tp_is_innermost_and_outside_data_parallel():
    groups = ParallelDims(dp_shard=2, tp=2, world_size=4).rank_groups()
    assert groups["tp"] == [[0, 1], [2, 3]]
    assert groups["dp"] == [[0, 2], [1, 3]]  # the ranks of a tp group read the same batch
    # Expert parallel borrows from dp_shard only: an ep group is the ranks of equal tp index, and
    # routing counts cover every rank's tokens (sequence parallel).
    groups = ParallelDims(dp_shard=2, tp=2, ep=2, world_size=4).rank_groups()
    assert groups["ep"] == [[0, 2], [1, 3]] and groups["dp_cp_tp"] == [[0, 1, 2, 3]]


def test_cp_ranks_share_samples_and_shard_the_weights_with_dp():
    dims = ParallelDims(dp_shard=2, cp=2, tp=2, world_size=8)
    groups = dims.rank_groups()
    assert groups["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]  # inside a dp_shard rank, outside tp
    assert groups["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]  # a cp group reads the same samples
    assert groups["fsdp"] == groups["dp_cp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert ParallelDims(dp_shard=2, cp=2, ep=4, world_size=4).rank_groups()["ep"] == [[0, 1, 2, 3]]
    assert dims.describe() == "pp=1 x dp_replicate=1 x dp_shard=2 x cp=2 x tp=2 x ep=1 (world 8, efsdp=4)"


@pytest.mark.parametrize("kwargs, message", [
    (dict(pp=0, world_size=2), "parallel.pp=0"),
    (dict(dp_shard=3, world_size=4), "world size is 4"),
    (dict(pp=3, world_size=4), "not divisible by pp*dp_replicate*cp*tp=3"),
    (dict(dp_shard=2, ep=4, world_size=2), "parallel.ep=4: must divide dp_shard*cp=2"),
    (dict(dp_shard=-2, world_size=2), "parallel.dp_shard=-2"),
    (dict(cp=3, world_size=4), "not divisible by pp*dp_replicate*cp*tp=3"),
])
def test_invalid_dims(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        ParallelDims(**kwargs)


def _groups_seen(rank: int, world_size: int) -> list[dict[str, list[int]]]:
    seen = []
    for layout in LAYOUTS:
        meshes = ParallelDims(world_size=world_size, **layout).build_meshes("cpu")
        views = {}
        for name in ("pp", "dp", "dp_cp", "dp_cp_tp", "fsdp", "cp", "tp", "ep", "efsdp"):
            mesh = getattr(meshes, name)
            # HSDP views are 2-D (replicate, shard): their last dimension is the shard group.
            group = mesh.get_group(mesh.ndim - 1)
            views[name] = dist.get_process_group_ranks(group)
        seen.append(views)
    return seen


def test_rank_groups_match_the_built_meshes():
    per_rank = run_ranks(_groups_seen, 4)
    for index, layout in enumerate(LAYOUTS):
        expected = ParallelDims(world_size=4, **layout).rank_groups()
        for rank, seen in enumerate(per_rank):
            for name, ranks in seen[index].items():
                assert ranks in expected[name], (layout, name, ranks)
                assert rank in ranks
