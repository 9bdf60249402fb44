"""The launcher's command line: which flags are torchrun's, and the world it checks the mesh against."""

from __future__ import annotations

import pytest

from harness.config import ConfigError, load_config
from launch.cli import main, split_args, world_size


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
    (["--nproc-per-node", "2", "--nproc-per-node=3"], ["--parallel.dp_shard=-1"], 3),  # torchrun reads the last
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


@pytest.mark.parametrize("argv, expected", [
    (["--bogus"], "error: --bogus: unknown flag; recipe overrides look like --section.field=value and torchrun "
                  "flags like --nproc-per-node=4 (python -m launch --help lists them)"),
    (["--steps=3"], "error: --steps=3: unknown flag; did you mean --train.steps=3?"),
    (["--nproc-per-nod", "2"], "error: --nproc-per-nod: unknown flag; did you mean --nproc-per-node?"),
    (["train.steps=3"], "error: train.steps=3: unexpected argument; recipe overrides look like --section.field=value"),
    (["--module", "x"], "error: --module: the launcher runs its own module; drop this flag"),
    (["--nnodes"], "error: --nnodes: missing its value"),
    (["--parallel.pp=2", "--parallel.dp_shard=2", "--parallel.pp_microbatches=0"],
     "error: parallel.pp_microbatches=0: must be > 0, or null for the default"),
    (["--checkpoint.every=-2"], "error: checkpoint.every=-2: must be > 0, or null for the default"),
    (["--config="], "error: --config: missing the recipe path"),
    (["--model=x"], "error: --model=x: model is a recipe section; set one of its fields, e.g. --model.preset=x"),
    (["--max-restarts", "abc"], "error: argument --max-restarts/--max_restarts: invalid int value: 'abc'; "
                                "fix that torchrun flag"),
    (["--max-restarts=-1"], "error: --max-restarts=-1: must be >= 0"),
    (["--rdzv-backend=bogus"], "error: --rdzv-backend=bogus: not a rendezvous backend; use one of "
                               "etcd, etcd-v2, c10d, static"),
    (["--standalone", "--nnodes=2"], "error: --standalone: a one-node rendezvous, but --nnodes=2; drop --standalone "
                                     "and give --rdzv-endpoint=HOST:PORT (or --master-addr/--master-port)"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [expected]
    assert not (tmp_path / "runs").exists()


def test_help_lists_the_recipe_sections_and_fields(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m launch [torchrun flags]")
    for expected in ["  run:", "    --run.name  (str | null, default null)",
                     "    --parallel.pp_schedule  (GPipe | 1F1B | Interleaved1F1B",
                     "    --ac.mode  (bool | none | full | selective | submodule | budget, default none)",
                     "        activation checkpointing; true = full, false = none",
                     "    --ac.budget_mib  (float | null, default null)",
                     "    --checkpoint.load_weights_only  (bool, default false)"]:
        assert expected in text, expected
