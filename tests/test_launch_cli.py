"""The launcher's command line: which flags are torchrun's, and the world it checks the mesh against."""

from __future__ import annotations

import pytest

from harness.config import ConfigError, load_config
from launch.cli import split_args, world_size


def test_torchrun_flags_pass_through_and_dotted_flags_are_the_recipe():
    argv = ["--nnodes", "2", "--node-rank=1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "h:29400", "--rdzv-id",
            "x", "--max-restarts", "3", "--config", "r.yaml", "--train.steps=5", "--master-port=1234"]
    recipe, overrides, torchrun = split_args(argv)
    assert recipe == "r.yaml"
    assert overrides == ["--train.steps=5"]
    assert torchrun == ["--nnodes", "2", "--node-rank=1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "h:29400",
                        "--rdzv-id", "x", "--max-restarts", "3", "--master-port=1234"]


@pytest.mark.parametrize("torchrun, mesh, expected", [
    (["--nproc-per-node", "2", "--nnodes", "2"], ["--parallel.dp_shard=-1"], 4),
    (["--nproc_per_node=3"], ["--parallel.dp_shard=-1"], 3),
    ([], ["--parallel.pp=2", "--parallel.dp_shard=2"], 4),
    (["--nnodes=2"], ["--parallel.dp_shard=4"], 4),
])
def test_world_size(torchrun, mesh, expected):
    assert world_size(load_config(None, mesh), torchrun) == expected


@pytest.mark.parametrize("torchrun, mesh, expected", [
    (["--nnodes", "1:2"], [], "--nnodes=1:2: give a fixed number of nodes"),
    (["--nproc-per-node", "many"], [], "--nproc-per-node=many: give a number"),
    (["--nnodes", "3"], ["--parallel.dp_shard=4"], "do not split evenly over 3 nodes"),
])
def test_world_size_refuses(torchrun, mesh, expected):
    with pytest.raises(ConfigError, match=expected):
        world_size(load_config(None, mesh), torchrun)

