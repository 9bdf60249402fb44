"""SLURM: torchrun flags from an allocation's environment, and the generated sbatch script."""

from __future__ import annotations

import subprocess

import pytest

from launch import slurm
from launch.cli import split_args, world_size
from harness.config import load_config

# The script's own recipe: the shipped default recipe is a demo that others change.
RECIPE = "model: {preset: llama}\nparallel: {dp_shard: 4}\n"

ALLOCATION = {"SLURM_JOB_ID": "81234", "SLURM_STEP_ID": "0", "SLURM_JOB_NUM_NODES": "4", "SLURM_NODEID": "2",
              "SLURM_JOB_NODELIST": "gpu[007-009,012]"}


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[007-009,012]", "gpu007"),
    ("node12,node3", "node12"),
    ("rack[2-3]-n[01-04],login1", "rack2-n01"),
    ("a[5],b[1-2]", "a5"),
    ("single", "single"),
])
def test_first_host_of_a_node_list(nodelist, first):
    assert slurm.parse_first_host(nodelist) == first


def test_bad_node_list_is_a_clear_error():
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        slurm.parse_first_host("gpu[007-009")


def test_allocation_gives_torchrun_its_multinode_flags():
    assert slurm.in_multinode_step(ALLOCATION)
    args = slurm.torchrun_args(ALLOCATION)
    assert args == ["--nnodes", "4", "--node-rank", "2", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", "gpu007:29734", "--rdzv-id", "81234"]
    # The world the launcher validates against: nodes x processes per node.
    _, overrides, torchrun = split_args([*args, "--nproc-per-node", "8", "--parallel.dp_shard=32"])
    assert world_size(load_config(None, overrides), torchrun) == 32


def test_one_node_or_no_step_keeps_the_local_defaults():
    assert not slurm.in_multinode_step({**ALLOCATION, "SLURM_JOB_NUM_NODES": "1"})
    assert not slurm.in_multinode_step({k: v for k, v in ALLOCATION.items() if k != "SLURM_STEP_ID"})
    assert slurm.names_rendezvous(["--rdzv-endpoint=h:1"]) and not slurm.names_rendezvous(["--max-restarts", "2"])


@pytest.fixture
def recipe(tmp_path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return str(path)


def test_sbatch_script(tmp_path, recipe):
    out = tmp_path / "job.sbatch"
    code = slurm.main(["--config", recipe, "--nodes", "2", "--gpus-per-node", "2",
                       "--out", str(out), "--checkpoint.dir=runs/ckpt", "--checkpoint.every=50"])
    assert code == 0
    script = out.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "trap preempted USR1",
                 'scancel --signal=USR1 "$SLURM_JOB_ID"', 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in script, line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "-m launch --nproc-per-node 2 --config /" in srun and "--checkpoint.dir=runs/ckpt" in srun
    subprocess.run(["bash", "-n", str(out)], check=True)


@pytest.mark.parametrize("args, expected", [
    (["--nodes", "2", "--gpus-per-node", "3", "--checkpoint.dir=c"], "world size is 6"),
    (["--nodes", "2", "--gpus-per-node", "2", "--checkpoint.dir=c", "--partition", "x"], "--partition: unknown flag"),
    (["--nodes", "2", "--gpus-per-node", "2", "--checkpoint.dir=c", "--parallel.tp=4", "--parallel.dp_shard=1"],
     "parallel.tp=4: larger than a node's 2 GPUs"),
])
def test_sbatch_refuses_bad_input(tmp_path, recipe, capsys, args, expected):
    out = tmp_path / "job.sbatch"
    assert slurm.main(["--config", recipe, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists()
