"""SLURM: torchrun's multi-node flags from an allocation, and an sbatch script for a recipe.

Inside `srun` on several nodes, `python -m launch` takes the node count, this node's rank and
the rendezvous (c10d on the allocation's first host, the job id as rendezvous id) from SLURM's
environment, unless the command line already names them.

`python -m launch.slurm --config R --nodes N --gpus-per-node G [--out job.sbatch] [--a.b=v ...]`
validates the recipe for N*G ranks and writes a script that runs one launcher per node. SLURM
sends USR1 two minutes before the time limit; the script passes it to every process of the job
step, the workers checkpoint at the next step boundary and exit, and the job is requeued: it
resumes from that checkpoint.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping

from harness.config import ConfigError, load_config
from harness.validation import validate

# c10d rendezvous port on the first host; offset by the job id so jobs sharing a head node differ.
_BASE_PORT = 29500
_PORT_SPREAD = 1000
_RENDEZVOUS_FLAGS = ("--nnodes", "--node-rank", "--node_rank", "--rdzv-endpoint", "--rdzv_endpoint",
                     "--master-addr", "--master_addr", "--standalone")


def in_multinode_step(env: Mapping[str, str]) -> bool:
    """True inside an srun job step that spans more than one node."""
    return "SLURM_STEP_ID" in env and "SLURM_JOB_ID" in env and int(_nodes(env)) > 1


def _nodes(env: Mapping[str, str]) -> str:
    return env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or "1"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `scontrol show hostnames`, else parsed here
    (`gpu[003-005,9],login1` -> `gpu003`) where scontrol is not on the PATH."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return parse_first_host(nodelist)


def parse_first_host(nodelist: str) -> str:
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    # Each bracket is a range list; its first entry's first value names the first host.
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read the first host")
    return host


def torchrun_args(env: Mapping[str, str]) -> list[str]:
    """torchrun's multi-node flags for this node of the job step."""
    job_id = env["SLURM_JOB_ID"]
    nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    port = _BASE_PORT + int(re.sub(r"\D", "", job_id) or 0) % _PORT_SPREAD
    return ["--nnodes", _nodes(env), "--node-rank", env["SLURM_NODEID"], "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{first_host(nodelist)}:{port}", "--rdzv-id", job_id]


def names_rendezvous(torchrun: list[str]) -> bool:
    return any(arg.split("=", 1)[0] in _RENDEZVOUS_FLAGS for arg in torchrun)


def sbatch_script(launch_args: list[str], nodes: int, gpus_per_node: int, workdir: str, python: str) -> str:
    command = shlex.join([python, "-m", "launch", "--nproc-per-node", str(gpus_per_node), *launch_args])
    return f"""#!/bin/bash
#SBATCH --job-name=harness
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120

# USR1 reaches this shell 120 s before the time limit (or on preemption). It is passed to every
# process of the training step; the workers save a checkpoint at the next step boundary and
# exit. The job is then requeued and resumes from that checkpoint.
preempted() {{
    scancel --signal=USR1 "$SLURM_JOB_ID"
    wait "$TRAIN_PID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}}
trap preempted USR1

cd {shlex.quote(workdir)}
srun --kill-on-bad-exit=1 {command} &
TRAIN_PID=$!
wait "$TRAIN_PID"
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--out", help="write the script here instead of stdout")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ConfigError(f"--nodes={args.nodes} --gpus-per-node={args.gpus_per_node}: both must be >= 1")
        unknown = [a for a in overrides if not (a.startswith("--") and "." in a.split("=", 1)[0])]
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown flag; recipe overrides look like --section.field=value")
        cfg = load_config(args.config, overrides)
        validate(cfg, args.nodes * args.gpus_per_node, gpus_per_node=args.gpus_per_node)
        if args.out and os.path.isdir(args.out):
            raise ConfigError(f"--out {args.out}: is a directory; give a file path for the script")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    script = sbatch_script(["--config", os.path.abspath(args.config), *overrides], args.nodes, args.gpus_per_node,
                           os.getcwd(), sys.executable)
    if args.out:
        with open(args.out, "w") as f:
            f.write(script)
        print(f"wrote {args.out}: submit it with sbatch {args.out}")
    else:
        print(script, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
