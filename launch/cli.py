"""Command line: split flags, validate, then spawn workers or run as one.

Flags that are not recipe overrides go to torchrun unchanged (`--nnodes`, `--node-rank`,
`--rdzv-*`, `--max-restarts`, `--master-addr/--master-port`, ...). Inside a multi-node srun
step the node count, node rank and rendezvous come from SLURM (launch/slurm.py) unless given.
"""

from __future__ import annotations

import os
import sys
from importlib import resources

import torch

from harness.checkpoint import checkpoint_step, finished_line, start_point
from harness.config import Config, ConfigError, load_config
from harness.plan import Plan
from harness.validation import validate
from launch import slurm
from launch.library_warnings import captured_warnings, write_warnings
from launch.recipe_help import recipe_help
from launch.torchrun_flags import check_torchrun_flag, check_torchrun_values

DEFAULT_RECIPE = str(resources.files("launch") / "recipes" / "default.yaml")


def split_args(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """(recipe, config overrides, torchrun flags): dotted `--a.b=v` flags are the recipe's."""
    recipe, overrides, torchrun = None, [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                recipe = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                recipe, i = argv[i + 1], i + 1
            else:
                recipe = ""
            if not recipe:
                raise ConfigError("--config: missing the recipe path")
        elif arg.startswith("--") and "." in arg.split("=", 1)[0]:
            overrides.append(arg)
        elif not arg.startswith("-"):
            raise ConfigError(f"{arg}: unexpected argument; recipe overrides look like --section.field=value")
        else:
            torchrun.append(arg)
            if check_torchrun_flag(arg):
                if i + 1 == len(argv):
                    raise ConfigError(f"{arg}: missing its value")
                torchrun.append(argv[i + 1])
                i += 1
        i += 1
    return recipe, overrides, torchrun


def _flag(torchrun: list[str], name: str) -> str | None:
    """Value of a torchrun flag given as `--name v`, `--name=v`, or with underscores; the last one
    when it is given twice, as torchrun's argument parser reads it."""
    spellings = {f"--{name}", f"--{name.replace('-', '_')}"}
    found = None
    for i, arg in enumerate(torchrun):
        key, eq, value = arg.partition("=")
        if key in spellings:
            found = value if eq else (torchrun[i + 1] if i + 1 < len(torchrun) else None)
    return found


def node_count(torchrun: list[str]) -> int:
    nodes = _flag(torchrun, "nnodes") or "1"
    if not nodes.isdigit() or int(nodes) < 1:
        raise ConfigError(f"--nnodes={nodes}: give a fixed number of nodes (elastic ranges are not supported)")
    if int(nodes) > 1 and "--standalone" in torchrun:
        # torchrun's --standalone rendezvous is on localhost: the other nodes could never join.
        raise ConfigError(f"--standalone: a one-node rendezvous, but --nnodes={nodes}; drop --standalone and "
                          "give --rdzv-endpoint=HOST:PORT (or --master-addr/--master-port)")
    return int(nodes)


def world_size(cfg: Config, torchrun: list[str]) -> int:
    """The world the workers will form: from torchrun's flags, or what the recipe's mesh needs."""
    nproc, nodes = _flag(torchrun, "nproc-per-node"), node_count(torchrun)
    if nproc is not None:
        if not nproc.isdigit() or int(nproc) < 1:
            raise ConfigError(f"--nproc-per-node={nproc}: give a number of processes per node")
        return int(nproc) * nodes
    p = cfg.parallel
    if p.dp_shard == -1:
        if torch.cuda.is_available():
            return torch.cuda.device_count() * nodes
        raise ConfigError("parallel.dp_shard=-1 needs a world size on CPU: set parallel.dp_shard "
                          "or pass --nproc-per-node")
    size = p.pp * p.dp_replicate * p.dp_shard * p.cp * p.tp
    if size % nodes:
        raise ConfigError(f"--nnodes={nodes}: the recipe's mesh needs {size} ranks, which do not split evenly "
                          f"over {nodes} nodes; pass --nproc-per-node or change the parallel sizes")
    return size


def main(argv: list[str]) -> int:
    if argv[:1] == ["plan"]:
        from launch.plan_cli import main as plan_main

        return plan_main(argv[1:])
    if "--help" in argv or "-h" in argv:
        print(recipe_help())
        return 0
    verbose = "--verbose" in argv
    argv = [arg for arg in argv if arg != "--verbose"]
    worker = "LOCAL_RANK" in os.environ
    with captured_warnings() as library_warnings:
        try:
            recipe, overrides, torchrun = split_args(argv)
            check_torchrun_values(torchrun)
            cfg = load_config(recipe or DEFAULT_RECIPE, overrides)
            if not worker and slurm.in_multinode_step(os.environ) and not slurm.names_rendezvous(torchrun):
                torchrun = slurm.torchrun_args(os.environ) + torchrun
            size = int(os.environ["WORLD_SIZE"]) if worker else world_size(cfg, torchrun)
            plan = validate(cfg, size)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            if verbose:
                print("\n".join(library_warnings), file=sys.stderr)
            return 2
    if os.environ.get("RANK", "0") == "0":
        write_warnings(library_warnings, plan.folder.launch_log)
    if worker:
        from launch.worker import run_worker

        return run_worker(cfg, plan)
    finished = nothing_to_train(cfg, plan)
    if finished is not None:
        print(finished)
        return 0
    from launch.spawn import spawn_workers

    config_args = (["--config", recipe] if recipe else []) + overrides
    return spawn_workers(config_args, torchrun, size // node_count(torchrun), plan.folder)


def nothing_to_train(cfg: Config, plan: Plan) -> str | None:
    """The line to print, without starting workers, when the run's checkpoint already reached
    train.steps; None when there is training to do."""
    start = start_point(cfg.checkpoint, plan.folder.checkpoint_dir)
    if start is None or start.weights_only:
        return None
    return finished_line(start.path, checkpoint_step(start.path), cfg.train.steps, plan.folder.checkpoint_dir)
